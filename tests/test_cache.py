"""Feature cache: hits/misses, namespace isolation, corruption detection, concurrent writers,
packs (few files, streaming reads), the old one-file-per-image entries, compaction."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from transferlab.cache import FeatureCache, default_cache_dir
from transferlab.cache.records import key_of


def _digest(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _features(i: int, dim: int = 1280) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def _packs(store) -> list[Path]:
    return sorted((store.path / "packs").glob("*.pack"))


def _write_old_entry(store, digest: str, array: np.ndarray, owner: str | None = None) -> Path:
    """An entry in the first cache format (one TLF1 file per image), as older versions wrote."""
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape),
                         "digest": owner or digest}).encode()  # fmt: skip
    header += b" " * ((-(8 + len(header))) % 64)
    body = b"TLF1" + struct.pack("<I", len(header)) + header + array.tobytes()
    path = store.path / digest[:2] / f"{digest}.feat"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return path


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


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "flip_digest", "zero"])
def test_damaged_record_is_a_miss_and_the_recomputed_one_is_read(tmp_path, damage):
    store = FeatureCache(tmp_path).namespace("x")
    key, value = _digest(7), _features(7)
    store.put_many({_digest(6): _features(6)})
    store.put_many({key: value, _digest(8): _features(8)})
    (pack,) = _packs(store)
    blob = bytearray(pack.read_bytes())
    rec = len(blob) // 3  # three records of one size: the middle one is `key`'s
    at = {"flip_payload": 2 * rec - 100, "flip_header": rec + 9, "flip_digest": rec + 50}
    if damage == "zero":
        blob[rec : 2 * rec] = bytes(rec)
    else:
        blob[at[damage]] ^= 0x01
    pack.write_bytes(bytes(blob))

    fresh = FeatureCache(tmp_path).namespace("x")  # another process's view of the same pack
    got = fresh.get_many([_digest(6), key, _digest(8)])
    assert set(got) == {_digest(6), _digest(8)}  # never returned, neighbours unaffected
    fresh.put_many({key: value})  # the caller recomputes it
    np.testing.assert_array_equal(fresh.get_many([key])[key], value)
    third = FeatureCache(tmp_path).namespace("x")  # a later process: skips the damaged copy
    np.testing.assert_array_equal(third.get_many([key])[key], value)


def test_truncated_pack_tail_keeps_earlier_records(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    items = {_digest(i): _features(i, 64) for i in range(10)}
    store.put_many(items)
    (pack,) = _packs(store)
    pack.write_bytes(pack.read_bytes()[:-50])  # a crash in the middle of the last record
    got = FeatureCache(tmp_path).namespace("x").get_many(list(items))
    assert set(got) == set(list(items)[:9])
    pack.with_suffix(".idx").unlink()  # and a lost index: rebuilt by scanning the pack
    got = FeatureCache(tmp_path).namespace("x").get_many(list(items))
    assert set(got) == set(list(items)[:9])
    for k in got:
        np.testing.assert_array_equal(got[k], items[k])


def test_record_of_another_digest_is_a_miss(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    a, b = "a" * 64, "b" * 64
    store.put_many({a: np.ones(4, np.float32)})
    idx = _packs(store)[0].with_suffix(".idx")
    entry = np.fromfile(idx, dtype=np.uint64, count=1)
    forged = idx.read_bytes()
    idx.write_bytes(forged + struct.pack("<Q", key_of(b)) + forged[8:])  # b's key -> a's record
    assert entry[0] == key_of(a)
    got = FeatureCache(tmp_path).namespace("x").get_many([a, b])
    assert list(got) == [a]


def test_read_into_streams_rows_and_returns_the_hit_mask(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    items = {_digest(i): _features(i, 32) for i in range(50)}
    store.put_many(dict(list(items.items())[:30]))
    store.put_many(dict(list(items.items())[30:]))
    wanted = [_digest(3), _digest(99), _digest(40), _digest(3), _digest(0)]
    out = np.lib.format.open_memmap(tmp_path / "m.npy", "w+", np.float32, (5, 32))
    out[:] = -1
    ok = store.read_into(wanted, out)
    assert ok.tolist() == [True, False, True, True, True]
    for row, d in enumerate(wanted):
        np.testing.assert_array_equal(out[row], items[d] if ok[row] else np.full(32, -1.0))
    with pytest.raises(ValueError, match="rows"):
        store.read_into(wanted, out[:2])


def test_many_entries_make_few_files_and_survive_reopening(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    n = 5000
    for start in range(0, n, 32):  # batch by batch, as extraction writes
        store.put_many({_digest(i): _features(i, 16) for i in range(start, min(start + 32, n))})
    files = [p for p in store.path.rglob("*") if p.is_file()]
    assert len(files) == 2  # one pack and its index
    out = np.zeros((n, 16), np.float32)
    assert (
        FeatureCache(tmp_path).namespace("x").read_into([_digest(i) for i in range(n)], out).all()
    )
    np.testing.assert_array_equal(out[4321], _features(4321, 16))


def test_old_one_file_entries_are_read_and_moved_into_a_pack(tmp_path):
    store = FeatureCache(tmp_path).namespace("x")
    old = {_digest(i): _features(i, 8) for i in range(3)}
    paths = [_write_old_entry(store, d, a) for d, a in old.items()]
    misfiled = _write_old_entry(store, _digest(5), _features(5, 8), owner=_digest(6))
    got = store.get_many([*old, _digest(5)])
    assert set(got) == set(old)  # an entry naming another image is a miss
    for d, a in old.items():
        np.testing.assert_array_equal(got[d], a)
    assert not any(p.exists() for p in [*paths, misfiled])  # moved (or dropped)
    got = FeatureCache(tmp_path).namespace("x").get_many(list(old))
    assert set(got) == set(old) and len(_packs(store)) == 1


def test_compaction_merges_finished_packs_and_old_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    for part in range(3):  # three runs, three packs, overlapping digests
        writer = cache.namespace("x")
        writer.put_many({_digest(i): _features(i, 8) for i in range(part * 5, part * 5 + 10)})
        writer.close()
    live = cache.namespace("x")
    live.put_many({_digest(100): _features(100, 8)})  # a writer still at work: left alone
    _write_old_entry(live, _digest(200), _features(200, 8))
    done = cache.namespace("x").compact()
    assert done == {"packs": 3, "records": 20, "dropped": 10, "migrated": 1}
    assert len(_packs(live)) == 2  # the merged pack and the live one
    assert not any(p.is_dir() and p.name != "packs" for p in live.path.iterdir())
    wanted = [_digest(i) for i in [*range(20), 100, 200]]
    got = cache.namespace("x").get_many(wanted)
    assert set(got) == set(wanted)
    np.testing.assert_array_equal(got[_digest(200)], _features(200, 8))


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
    assert len(_packs(store)) == 2  # one pack per writer, never shared


def test_cache_info_prune_and_compact_treat_a_pack_and_its_index_as_one(tmp_path):
    from transferlab.cache_admin import cache_info, compact_cache, prune_cache

    cache = FeatureCache(tmp_path)
    for part in range(2):
        store = cache.namespace("x")
        store.put_many({_digest(i): _features(i, 8) for i in range(part * 4, part * 4 + 6)})
        store.close()
    info = cache_info(tmp_path)
    assert info.files == 4 and info.entries == 12
    assert compact_cache(tmp_path) == {"packs": 2, "records": 10, "dropped": 2, "migrated": 0}
    info = cache_info(tmp_path)
    assert info.files == 2 and info.entries == 10
    done = prune_cache(tmp_path, max_bytes=0)
    assert done["files"] == 2 and done["kept_bytes"] == 0
    assert cache.namespace("x").get_many([_digest(0)]) == {}


def test_cache_commands_say_files_and_features(tmp_path):
    """`transferlab cache info` counts files and features apart (packs hold many), and
    `cache compact` merges the packs."""
    import subprocess
    import sys

    cache = FeatureCache(tmp_path)
    for part in range(2):
        store = cache.namespace("x")
        store.put_many({_digest(i): _features(i, 8) for i in range(part * 4, part * 4 + 6)})
        store.close()

    def tl(*args):
        cmd = [sys.executable, "-m", "transferlab", "cache", *args, "--cache-dir", str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = tl("info")
    assert r.returncode == 0 and "in 4 files (12 features)" in r.stdout, r.stdout + r.stderr
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"x" * 10)
    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "k.json").write_bytes(b"{}")
    r = tl("info")  # report figures and backbone cards: listed under their own names
    assert "figures: 10 B, 1 files" in r.stdout and "backbones: 2 B, 1 files" in r.stdout
    assert "in 6 files (12 features)" in r.stdout
    for p in (tmp_path / "figures" / "a.png", tmp_path / "backbones" / "k.json"):
        p.unlink()
    r = tl("compact")
    assert r.returncode == 0 and "merged 2 packs: 10 features kept, 2 dropped" in r.stdout
    assert "in 2 files (10 features)" in tl("info").stdout
