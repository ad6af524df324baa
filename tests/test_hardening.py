"""Issue 11's corpus: every numbered case of the probe, each with the behaviour it must have now.

1 symlink loops · 2 names that are not UTF-8 · 3 dangling links, unreadable folders, .heic ·
6 a hand-edited model.json · 7 paths out of the run folder · 8 writes that fail · 10 cache
entries under another image's name. (4, 5 and 9, the server's, are in tests/test_serve.py.)
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image
from transferlab.cache import FeatureCache
from transferlab.config import FitConfig
from transferlab.data.discover import discover
from transferlab.data.prepared import prepare_data
from transferlab.data.split import split_folder
from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.predict.sources import iter_sources
from transferlab.runs import _read_meta
from transferlab.storage import (
    atomic_write_text,
    printable_path,
    read_json,
    save_tensors,
    write_json,
)

ODD = os.fsdecode(b"odd-\xff\xfe.png")  # a file name that is not valid UTF-8


def _classes(root: Path, n: int = 6) -> Path:
    for label, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        for i in range(n):
            make_image(root / label / f"{label}{i}.png", (12, 12), color=colour, seed=i + 7 * n)
    return root


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """Two good classes plus a link loop, a dangling link, a .heic and an odd name."""
    root = _classes(tmp_path / "data")
    os.symlink("b.jpg", root / "cat" / "a.jpg")
    os.symlink("a.jpg", root / "cat" / "b.jpg")
    os.symlink("missing.jpg", root / "dog" / "gone.jpg")
    (root / "dog" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    make_image(root / "dog" / ODD, (12, 12), color=(40, 40, 200), seed=99)
    return root


# -- 1, 3: every path accounted for ---------------------------------------------------------


def test_discovery_reports_loops_dangling_links_and_heic_by_path(hostile: Path) -> None:
    index = discover(hostile)
    reasons = {Path(p).name: r for p, r in index.unusable}
    assert reasons["a.jpg"] == reasons["b.jpg"] == "symbolic link loop"
    assert reasons["gone.jpg"].startswith("dangling symbolic link")
    assert reasons["photo.heic"].startswith("unsupported image format .heic")
    assert [Path(p).name for p in index.odd_names] == [ODD]
    assert ODD in {Path(s.path).name for s in index.samples}  # kept: it is a good image
    saved = index.to_dict()
    # JSON escapes the name's bytes (ASCII text) and reads back the very same path.
    json.dumps(saved).encode("ascii")
    assert json.loads(json.dumps(saved))["samples"] == saved["samples"]
    assert {Path(u["path"]).name for u in saved["unusable"]} >= {"a.jpg", "gone.jpg"}


def test_prepare_skips_and_records_them_and_strict_fails(hostile: Path) -> None:
    prepared = prepare_data(hostile, FitConfig(workers=0))
    skipped = {Path(p["path"]).name: p["reason"] for p in prepared.summary()["skipped"]}
    assert {"a.jpg", "b.jpg", "gone.jpg", "photo.heic"} <= set(skipped)
    with pytest.raises(TransferlabError) as err:
        prepare_data(hostile, FitConfig(workers=0, strict=True))
    text = str(err.value)
    assert "--strict" in text and "symbolic link loop" in text and "photo.heic" in text
    assert "not valid UTF-8" in text and "odd-\\xff\\xfe.png" in text


def test_split_command_survives_a_link_loop(hostile: Path, tmp_path: Path) -> None:
    counts = split_folder(hostile, tmp_path / "out", fractions=(0.5, 0.25, 0.25))
    assert sum(sum(c.values()) for c in counts.values()) == 13  # 12 + the odd name


def _lock_folders_named_locked(monkeypatch) -> None:
    """Listing a folder named "locked" fails as without permission (tests run as root too)."""
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folder_is_reported_not_fatal(tmp_path: Path, monkeypatch) -> None:
    root = _classes(tmp_path / "data")
    (root / "dog" / "locked").mkdir()
    _lock_folders_named_locked(monkeypatch)
    index = discover(root)
    assert [(Path(p).name, r) for p, r in index.unusable] == [
        ("locked", "unreadable folder (Permission denied)")
    ]
    assert len(index.samples) == 12


def test_predict_names_every_path_it_cannot_use(hostile: Path, monkeypatch) -> None:
    import transferlab.predict.sources as sources

    warned: list[str] = []
    monkeypatch.setattr(sources, "warn", warned.append)
    (hostile / "dog" / "locked").mkdir()
    _lock_folders_named_locked(monkeypatch)
    paths = list(iter_sources(hostile))
    assert len(paths) == 13
    err = "\n".join(warned)
    for name, why in [
        ("a.jpg", "symbolic link loop"),
        ("gone.jpg", "dangling symbolic link"),
        ("photo.heic", "unsupported image format .heic"),
        ("locked", "unreadable folder"),
    ]:
        assert name in err and why in err, name


# -- 2: names that are not UTF-8, through JSON, CSV and text files ------------------------------


def test_odd_names_are_written_as_escapes_not_crashes(tmp_path: Path) -> None:
    assert printable_path(ODD) == "odd-\\xff\\xfe.png"
    atomic_write_text(tmp_path / "r.html", f"<p>{ODD}</p>")
    assert (tmp_path / "r.html").read_text() == "<p>odd-\\xff\\xfe.png</p>"
    write_json(tmp_path / "d.json", {"path": ODD})
    assert read_json(tmp_path / "d.json") == {"path": ODD}  # round-trips to the real name
    assert not list(tmp_path.glob("*.tmp*"))


def test_save_predictions_with_an_odd_name(tmp_path: Path) -> None:
    from transferlab.data.prepared import Split
    from transferlab.evaluation.analysis import save_predictions

    split = Split(paths=[f"/d/{ODD}"], labels=np.array([0]), digests=["0" * 64])
    out = save_predictions(tmp_path, {"test": (split, np.array([[0.9, 0.1]]))}, ["a", "b"])
    assert "odd-\\xff\\xfe.png" in out.read_text(encoding="utf-8")


# -- 6, 7: model.json validated on load --------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder's model.json + head.safetensors (all that _read_meta reads)."""
    out = tmp_path / "run"
    out.mkdir()
    head = {"kind": "linear", "in_features": 8, "num_classes": 2}
    save_tensors(build_head(head).state_dict(), out / "head.safetensors")
    meta = {
        "format_version": 1,
        "classes": ["cat", "dog"],
        "preprocess": {"input_size": [64, 64], "interpolation": "bilinear", "crop_pct": 0.875,
                       "crop_mode": "center", "mean": [0.5] * 3, "std": [0.25] * 3},
        "body": {"spec": "mobilenetv2_035", "weights_hash": "ab" * 32, "trained": False,
                 "recipe": {"kind": "timm", "architecture": "mobilenetv2_035", "model_args": {}}},
        "head": head,
        "strategy": "features",
        "temperature": 1.0,
        "config": {"cache_dir": None},
        "versions": {},
    }  # fmt: skip
    (out / "model.json").write_text(json.dumps(meta))
    return out


def _edit(run: Path, change) -> None:
    meta = json.loads((run / "model.json").read_text())
    change(meta)
    (run / "model.json").write_text(json.dumps(meta))


EDITS = {
    "temperature -1": (lambda m: m.update(temperature=-1), "temperature"),
    "temperature 0": (lambda m: m.update(temperature=0), "temperature"),
    "temperature NaN": (lambda m: m.update(temperature=float("nan")), "temperature"),
    "std 0": (lambda m: m["preprocess"].update(std=[0, 0, 0]), "preprocess.std"),
    "3 classes, 2 outputs": (lambda m: m.update(classes=["a", "b", "c"]), "head.num_classes"),
    "classes a string": (lambda m: m.update(classes="catdog"), "classes"),
    "classes empty": (lambda m: m.update(classes=[]), "classes"),
    "classes repeated": (lambda m: m.update(classes=["a", "a"]), "unique"),
    "input 20000": (lambda m: m["preprocess"].update(input_size=[20000, 20000]), "input_size"),
    "crop 0": (lambda m: m["preprocess"].update(crop_pct=0), "crop_pct"),
    "missing head": (lambda m: m.pop("head"), "head"),
    "non-numeric": (lambda m: m["preprocess"].update(mean=["x", 0, 0]), "preprocess.mean"),
    "head shape": (lambda m: m["head"].update(in_features=9), "head.safetensors"),
    "checkpoint_path": (
        lambda m: m["body"]["recipe"]["model_args"].update(checkpoint_path="/etc/passwd"),
        "checkpoint_path",
    ),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_hand_edited_model_json_is_refused_naming_the_field(run: Path, case: str) -> None:
    change, field = EDITS[case]
    assert _read_meta(run)["classes"] == ["cat", "dog"]  # the untouched run loads
    _edit(run, change)
    with pytest.raises(TransferlabError) as err:
        _read_meta(run)
    assert field in str(err.value)
    assert "Traceback" not in str(err.value)


def test_cache_dir_outside_the_run_must_be_a_feature_cache(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "somewhere"
    (target / "docs").mkdir(parents=True)
    _edit(run, lambda m: m["config"].update(cache_dir=str(target)))
    with pytest.raises(TransferlabError, match="config.cache_dir"):
        _read_meta(run)
    (target / "features").mkdir()  # a real cache: accepted
    assert _read_meta(run)["config"]["cache_dir"] == str(target)
    _edit(run, lambda m: m["config"].update(cache_dir=str(tmp_path / "gone")))
    _read_meta(run)  # absent here: predict then uses the default cache


# -- 8: writes that fail ----------------------------------------------------------------------


def test_full_disk_is_one_error_and_no_half_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "model.json").write_text('{"old": true}')

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(TransferlabError) as err:
        atomic_write_text(tmp_path / "model.json", '{"new": true}')
    assert "model.json: cannot write (No space left on device)" in str(err.value)
    assert (tmp_path / "model.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_failed_tensor_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import transferlab.storage as storage

    class SafetensorError(Exception):
        pass

    def half_write(tensors, path):
        Path(path).write_bytes(b"\x00" * 10)
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(storage, "save_file", half_write)
    with pytest.raises(TransferlabError, match=r"head.safetensors: cannot write \(Error while"):
        save_tensors({"w": torch.zeros(2)}, tmp_path / "head.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_weights_are_as_readable_as_the_json_beside_them(tmp_path: Path) -> None:
    """safetensors writes 0600 files: a run's weights (and a cache's backbone cards) must still
    be readable by whoever can read its model.json, e.g. a server running as another user."""
    save_tensors({"w": torch.zeros(2)}, tmp_path / "head.safetensors")
    assert (tmp_path / "head.safetensors").stat().st_mode & 0o777 == 0o644


def test_unwritable_folder_is_one_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "metrics.json"
    with pytest.raises(TransferlabError, match="metrics.json: cannot write"):
        write_json(missing, {})


# -- 10: a cache entry belongs to one image ----------------------------------------------------


def test_full_disk_in_the_cache_is_one_warning_and_no_entry(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    import transferlab.cache as cache

    warned: list[str] = []
    monkeypatch.setattr(cache, "warn", warned.append)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    store = FeatureCache(tmp_path).namespace("backbone-x")
    for _ in range(3):
        store.put_many({"c" * 64: np.ones(4, np.float32)})
    assert len(warned) == 1 and "No space left on device" in warned[0]
    assert store.get_many(["c" * 64]) == {}


def test_split_copy_failure_leaves_no_half_image(tmp_path: Path, monkeypatch) -> None:
    import transferlab.data.split as split

    src = _classes(tmp_path / "data", n=4)

    def half_copy(a, b):
        Path(b).write_bytes(b"\xff\xd8\xff")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(split.shutil, "copy2", half_copy)
    with pytest.raises(TransferlabError, match=r"cannot copy .*No space left on device"):
        split_folder(src, tmp_path / "out", fractions=(0.5, 0.5))
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
