"""The scan index: a re-scan reads only new or changed files, remembers failures, survives a
damaged or unwritable cache and concurrent runs; the fit and the report use it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_image
from transferlab.config import FitConfig
from transferlab.data import scan, scan_index
from transferlab.data.images import file_digest
from transferlab.data.prepared import prepare_data
from transferlab.data.scan import file_digests, scan_files
from transferlab.data.scan_index import RACY_NS, ScanIndex, index_path
from transferlab.evaluation.run_data import resolve_splits

HOUR_NS = 3600 * 10**9


def _backdate(*paths: Path, ago_ns: int = HOUR_NS) -> None:
    """Files written a while ago: fresh ones are racy and deliberately not remembered."""
    t = time.time_ns() - ago_ns
    for p in paths:
        os.utime(p, ns=(t, t))


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [
        make_image(tmp_path / "data" / "a" / f"{i}.jpg", (40 + i, 30), seed=i) for i in range(5)
    ]
    _backdate(*paths)
    return paths


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the scan opens and checks (workers=1 keeps it in this process)."""
    seen: list[str] = []
    real = scan._scan_one

    def counting(args):
        seen.append(args[0])
        return real(args)

    monkeypatch.setattr(scan, "_scan_one", counting)
    return seen


def _scan(paths, cache: Path, **kw) -> scan.ScanResult:
    root = Path(paths[0]).parents[1]
    return scan_files([str(p) for p in paths], workers=1, index_root=root, cache_dir=cache, **kw)


def test_second_scan_reads_no_unchanged_file(files, reads, tmp_path):
    cache = tmp_path / "cache"
    first = _scan(files, cache)
    assert len(reads) == 5 and first.unchanged == 0 and first.failures == []
    assert first.digests == [file_digest(p) for p in files]
    reads.clear()
    again = _scan(files, cache)
    assert reads == [] and again.unchanged == 5
    assert again.digests == first.digests and again.failures == []
    assert index_path(files[0].parents[1], cache).is_file()


def test_rows_of_deleted_files_are_dropped_and_others_kept(files, reads, tmp_path):
    """A file gone from disk loses its row at the next scan; a file that still exists but was
    not in this scan (another subset of the root) keeps its row."""
    import sqlite3

    cache = tmp_path / "cache"
    _scan(files, cache)
    files[0].unlink()
    _scan(files[1:3], cache)  # 0 is gone, 3 and 4 exist but are not scanned now
    db = sqlite3.connect(index_path(files[0].parents[1], cache))
    stored = {os.fsdecode(r[0]) for r in db.execute("SELECT path FROM files")}
    db.close()
    assert stored == {str(p.resolve()) for p in files[1:]}
    reads.clear()
    assert _scan(files[1:], cache).unchanged == 4 and reads == []


def test_touch_replace_truncate_are_each_rechecked(files, reads, tmp_path):
    cache = tmp_path / "cache"
    before = _scan(files, cache).digests
    _backdate(files[0], ago_ns=HOUR_NS // 2)  # touched: same bytes, new mtime
    # same size, mtime put back: only ctime (and maybe inode) tell it changed
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0xFF
    st = files[1].stat()
    files[1].write_bytes(bytes(data))
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    files[2].write_bytes(files[2].read_bytes()[:200])  # truncated JPEG
    _backdate(files[2])
    reads.clear()
    after = _scan(files, cache)
    assert sorted(reads) == sorted(str(p) for p in files[:3])
    assert after.digests[0] == before[0]
    assert after.digests[1] == file_digest(files[1]) != before[1]
    assert after.digests[3:] == before[3:]
    [(i, reason)] = after.failures
    assert i == 2 and "truncated" in reason
    reads.clear()  # the failure is remembered: reported again without decoding again
    assert _scan(files, cache).failures == after.failures and reads == []


def test_pixel_limit_is_judged_from_the_stored_size(files, reads, tmp_path):
    cache = tmp_path / "cache"
    _scan(files, cache)
    reads.clear()
    small = _scan(files, cache, max_pixels=41 * 30)
    assert reads == []
    fresh = scan_files([str(p) for p in files], workers=1, max_pixels=41 * 30)
    assert small.failures == fresh.failures and [i for i, _ in small.failures] == [2, 3, 4]
    assert "over the limit of 1230" in small.failures[0][1]
    # judged from the stored sizes again, with no reading, under a wider limit
    assert [i for i, _ in _scan(files, cache, max_pixels=42 * 30).failures] == [3, 4]
    # a failure found (not judged from a size) under one limit is checked again under another
    other = tmp_path / "other"
    _scan(files, other, max_pixels=41 * 30)
    reads.clear()
    wider = _scan(files, other, max_pixels=42 * 30)
    assert sorted(reads) == sorted(str(p) for p in files[2:])
    assert [i for i, _ in wider.failures] == [3, 4] and "limit of 1260" in wider.failures[0][1]


def test_a_freshly_written_file_is_not_remembered(files, reads, tmp_path):
    cache = tmp_path / "cache"
    os.utime(files[0], ns=(time.time_ns(),) * 2)
    _scan(files, cache)
    reads.clear()
    _scan(files, cache)
    assert reads == [str(files[0])]
    assert RACY_NS >= 10**9  # coarse (1-2 s) filesystem timestamps are covered


def test_corrupt_index_is_rebuilt(files, reads, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    db = index_path(files[0].parents[1], cache)
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    warnings: list[str] = []
    monkeypatch.setattr(scan_index, "warn", warnings.append)
    assert _scan(files, cache).digests == [file_digest(p) for p in files]
    reads.clear()
    assert _scan(files, cache).unchanged == 5 and reads == []
    assert warnings == []


def test_unwritable_cache_dir_disables_the_index_with_one_warning(
    files, reads, tmp_path, monkeypatch
):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache dir should be")
    warnings: list[str] = []
    monkeypatch.setattr(scan_index, "warn", warnings.append)
    monkeypatch.setattr(scan_index, "_warned", set())
    for _ in range(2):
        got = _scan(files, blocker)
        assert got.digests == [file_digest(p) for p in files] and got.unchanged == 0
    assert len(reads) == 10
    assert len(warnings) == 1 and "scan index" in warnings[0] and "writable" in warnings[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_index_file_disables_the_index(files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _scan(files, cache)
    os.chmod(index_path(files[0].parents[1], cache).parent, 0o500)
    monkeypatch.setattr(scan_index, "warn", lambda m: None)
    try:
        files[0].write_bytes(files[1].read_bytes())
        _backdate(files[0])
        assert _scan(files, cache).digests[0] == file_digest(files[1])
    finally:
        os.chmod(index_path(files[0].parents[1], cache).parent, 0o700)


_WORKER = """
import os, sys, time
from transferlab.data.scan import scan_files
root, cache, tag = sys.argv[1:4]
paths = sorted(os.path.join(root, tag, f) for f in os.listdir(os.path.join(root, tag)))
open(os.path.join(cache, "ready-" + tag), "w").close()
while len([f for f in os.listdir(cache) if f.startswith("ready-")]) < 2:
    time.sleep(0.01)  # start together: the rounds below must overlap
for i in range(20):  # every round a new mtime: every file is read and written to the index
    t = time.time_ns() - (3600 - i) * 10**9
    for p in paths:
        os.utime(p, ns=(t, t))
    got = scan_files(paths, workers=1, index_root=root, cache_dir=cache)
    assert got.unchanged == 0 and None not in got.digests and not got.failures, got
print("ok", flush=True)
"""


def test_two_processes_share_one_index(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    for tag in ("a", "b"):
        for i in range(8):
            make_image(root / tag / f"{i}.png", (16, 16), seed=i + (tag == "b") * 100)
    cache.mkdir()
    env = {**os.environ, "TRANSFERLAB_QUIET": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(cache), tag],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(o.strip() == "ok" and "warning" not in e for o, e in outs), outs
    everything = sorted(str(p) for p in root.rglob("*.png"))
    index = ScanIndex.open(root, cache)
    assert index is not None
    keys = [scan_index.file_key(os.stat(p)) for p in everything]
    known = index.lookup(everything, keys)
    index.close()
    assert [k.digest if k else None for k in known] == [file_digest(p) for p in everything]


def test_prepare_data_and_recorded_splits_use_the_index(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    _backdate(*tiny_dataset.rglob("*.jpg"))
    cfg = FitConfig(cache_dir=str(tmp_path / "cache"), workers=0)
    first = prepare_data(tiny_dataset, cfg)
    assert "unchanged" not in capsys.readouterr().err
    monkeypatch.setattr(scan, "_scan_one", lambda args: pytest.fail(f"read {args[0]}"))
    monkeypatch.setattr(scan, "file_digest", lambda p: pytest.fail(f"hashed {p}"))
    again = prepare_data(tiny_dataset, cfg)
    assert "16 of 16 files unchanged since the last check" in capsys.readouterr().err
    assert {k: s.digests for k, s in again.splits.items()} == {
        k: s.digests for k, s in first.splits.items()
    }
    # a run's recorded splits (no dataset folder given) take their digests from the index too
    got = resolve_splits(first.summary(), ("train", "test"), config={"cache_dir": cfg.cache_dir})
    assert got["test"].digests == first.splits["test"].digests
    changed = first.splits["test"].paths[0]
    _backdate(Path(changed), ago_ns=HOUR_NS // 2)
    hashed: list[str] = []
    monkeypatch.setattr(scan, "file_digest", lambda p: hashed.append(p) or file_digest(p))
    assert file_digests(
        first.splits["test"].paths, index_root=tiny_dataset, cache_dir=cfg.cache_dir
    ) == (first.splits["test"].digests)
    assert hashed == [changed]
