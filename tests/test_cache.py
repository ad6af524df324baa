"""Feature cache: hits/misses, namespace isolation, corruption detection, concurrent writers."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from transferlab.cache import FeatureCache, default_cache_dir


def _digest(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _features(i: int, dim: int = 1280) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def _entry(store, digest: str) -> Path:
    return store.path / digest[:2] / f"{digest}.feat"


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert FeatureCache().root == tmp_path / "c"
    assert FeatureCache(tmp_path).exports_dir == tmp_path / "exports"
    monkeypatch.delenv("TRANSFERLAB_CACHE")
    assert "transferlab" in str(default_cache_dir())


def test_hit_and_miss(tmp_path):
    store = FeatureCache(tmp_path).namespace("mobilenetv2_100-abc")
    items = {_digest(i): _features(i) for i in range(3)}
    assert store.get_many(list(items)) == {}
    store.put_many(items)
    got = store.get_many([*items, _digest(99)])
    assert set(got) == set(items)
    for k, v in items.items():
        assert got[k].dtype == np.float32 and got[k].shape == (1280,)
        np.testing.assert_array_equal(got[k], v)
    got[_digest(0)][0] = 1.0  # returned arrays are the caller's own (writable, not a view)


def test_other_identity_misses(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.namespace("resnet18-aaa").put_many({_digest(0): _features(0)})
    assert cache.namespace("resnet18-aab").get_many([_digest(0)]) == {}
    assert cache.namespace("a/../weird id").path.parent == tmp_path / "features"  # slugged


def test_roundtrip_other_dtypes_and_shapes(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    arrays = {
        _digest(1): np.arange(12, dtype=np.int64).reshape(3, 4),
        _digest(2): np.arange(5, dtype=">f4"),  # big-endian input comes back equal
        _digest(3): np.zeros((0, 7), dtype=np.float16),
        _digest(4): np.float32(3.5) * np.ones((), dtype=np.float32),
    }
    store.put_many(arrays)
    got = store.get_many(list(arrays))
    for k, v in arrays.items():
        assert got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_rejects_non_digest_keys_and_object_arrays(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    with pytest.raises(ValueError):
        store.put_many({"../../etc/passwd": _features(0)})
    with pytest.raises(ValueError):
        store.get_many(["ABC"])
    with pytest.raises(TypeError):
        store.put_many({_digest(0): np.array([object()])})


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_payload", "flip_header", "append", "empty", "garbage"],
)
def test_corrupt_entry_is_a_miss_and_gets_replaced(tmp_path, damage):
    store = FeatureCache(tmp_path).namespace("x")
    key, value = _digest(7), _features(7)
    store.put_many({key: value, _digest(8): _features(8)})
    path = _entry(store, key)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_payload":
        blob[len(blob) - 100] ^= 0x01
    elif damage == "flip_header":
        blob[12] ^= 0x20
    elif damage == "append":
        blob += b"\0\0\0\0"
    elif damage == "empty":
        blob = bytearray()
    else:
        blob = bytearray(b"TLF1" + b"\xff" * 64)
    path.write_bytes(bytes(blob))

    got = store.get_many([key, _digest(8)])
    assert key not in got and _digest(8) in got  # never returned, neighbours unaffected
    assert not path.exists()  # dropped, so the recomputed value takes its place
    store.put_many({key: value})
    np.testing.assert_array_equal(store.get_many([key])[key], value)


def _writer(root: str, worker: int, rounds: int, n: int, barrier) -> None:
    store = FeatureCache(Path(root)).namespace("shared-ns")
    barrier.wait(timeout=60)  # start together so the writes really overlap
    for r in range(rounds):
        # Same digests in both workers (same content -> same features, as in real use), written
        # in opposite orders to maximise overlapping writes; plus a few entries of their own.
        order = range(n) if (worker + r) % 2 == 0 else reversed(range(n))
        store.put_many({_digest(i): _features(i, 256) for i in order})
        store.put_many({_digest(10_000 * (worker + 1) + r): _features(worker, 256)})
        store.get_many([_digest(i) for i in range(n)])


def test_concurrent_writers_leave_a_valid_cache(tmp_path):
    ctx = mp.get_context("spawn")  # fork after torch/OpenMP init in the test process can hang
    n, rounds = 150, 4
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), w, rounds, n, barrier)) for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    store = FeatureCache(tmp_path).namespace("shared-ns")
    got = store.get_many([_digest(i) for i in range(n)])
    assert len(got) == n
    for i in range(n):
        np.testing.assert_array_equal(got[_digest(i)], _features(i, 256))
    own = [_digest(10_000 * (w + 1) + r) for w in range(2) for r in range(rounds)]
    assert len(store.get_many(own)) == len(own)
    assert not list(store.path.rglob(".tmp-*"))  # no temp files left behind
