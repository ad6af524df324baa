"""``split_folder``: counts, copy vs hard link, refusals, reproducibility, source untouched."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
from pathlib import Path

import pytest

from conftest import make_image
from transferlab.data import split as split_module
from transferlab.data.split import split_folder
from transferlab.errors import TransferlabError


def _raw(root: Path, sizes: dict[str, int]) -> Path:
    for label, n in sizes.items():
        for i in range(n):
            make_image(root / label / f"{label}.{i}.png", (6, 6), seed=i)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _tree(root: Path) -> dict[str, list[str]]:
    return {
        str(d.relative_to(root)): sorted(p.name for p in d.iterdir())
        for d in sorted(root.glob("*/*"))
    }


def test_per_class_counts_and_source_untouched(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"cat": 12, "dog": 10})
    before = _snapshot(src)
    counts = split_folder(src, tmp_path / "out", per_class=[5, 2, 2])
    assert counts == {s: {"cat": n, "dog": n} for s, n in (("train", 5), ("val", 2), ("test", 2))}
    tree = _tree(tmp_path / "out")
    assert {k: len(v) for k, v in tree.items()} == {
        f"{s}/{c}": n for s, n in (("train", 5), ("val", 2), ("test", 2)) for c in ("cat", "dog")
    }
    picked = [n for names in tree.values() for n in names]
    assert len(picked) == len(set(picked))  # disjoint splits
    assert _snapshot(src) == before


def test_unusable_files_are_reported_and_never_placed(tmp_path: Path, caplog) -> None:
    """A file fit would skip is not copied into a split: the counts asked for are the images
    fit trains on."""
    src = _raw(tmp_path / "raw", {"cat": 6, "dog": 6})
    (src / "cat" / "fake.jpg").write_text("not an image")
    good = (src / "dog" / "dog.0.png").read_bytes()
    (src / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        counts = split_folder(src, tmp_path / "out", fractions=[0.5, 0.5])
    assert counts == {"train": {"cat": 3, "dog": 3}, "val": {"cat": 3, "dog": 3}}
    placed = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert len(placed) == 12 and not placed & {"fake.jpg", "truncated.png"}
    assert "skipped 2 unusable file(s)" in caplog.text
    assert "fake.jpg" in caplog.text and "truncated.png" in caplog.text


def test_manifest_procedure_and_seed(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"cat": 12, "dog": 4})
    split_folder(src, tmp_path / "a", per_class=[2, 1, 1], seed=42)
    split_folder(src, tmp_path / "b", per_class=[2, 1, 1], seed=42)
    split_folder(src, tmp_path / "c", per_class=[2, 1, 1], seed=1)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") != _tree(tmp_path / "c")
    # Numeric sort (cat.2 before cat.10), Random(seed).shuffle, consecutive slices.
    names = [f"cat.{i}.png" for i in range(12)]
    random.Random(42).shuffle(names)
    tree = _tree(tmp_path / "a")
    assert tree["train/cat"] == sorted(names[:2])
    assert tree["val/cat"] == sorted(names[2:3]) and tree["test/cat"] == sorted(names[3:4])


def test_fractions_use_every_image_when_they_sum_to_one(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"a": 10, "b": 21})
    counts = split_folder(src, tmp_path / "out", fractions=[0.7, 0.15, 0.15])
    assert counts == {
        "train": {"a": 6, "b": 15},  # train takes what rounding (half up) leaves
        "val": {"a": 2, "b": 3},
        "test": {"a": 2, "b": 3},
    }


def test_two_numbers_make_train_and_val_only(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"a": 4, "b": 4})
    assert split_folder(src, tmp_path / "out", fractions=[0.5, 0.25]) == {
        "train": {"a": 2, "b": 2},
        "val": {"a": 1, "b": 1},
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "val"]


def test_pools_existing_splits(tiny_dataset: Path, tmp_path: Path) -> None:
    counts = split_folder(tiny_dataset, tmp_path / "out", per_class=[6, 1, 1])
    assert counts["train"] == {"a": 6, "b": 6}


def test_copy_vs_hard_link(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"a": 3, "b": 3})
    split_folder(src, tmp_path / "copied", per_class=[1, 1, 1])
    split_folder(src, tmp_path / "linked", per_class=[1, 1, 1], link=True)
    for name in os.listdir(tmp_path / "linked" / "train" / "a"):
        linked = tmp_path / "linked" / "train" / "a" / name
        copied = tmp_path / "copied" / "train" / "a" / name
        original = src / "a" / name
        assert os.path.samefile(linked, original)
        assert not os.path.samefile(copied, original)
        assert copied.read_bytes() == original.read_bytes()


def test_link_falls_back_to_copy_across_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def cross_device(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(split_module.os, "link", cross_device)
    src = _raw(tmp_path / "raw", {"a": 2, "b": 2})
    with caplog.at_level(logging.WARNING):
        split_folder(src, tmp_path / "out", per_class=[1, 1], link=True)
    assert "copied 4 file(s) instead" in caplog.text
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4


def test_refuses_non_empty_dest(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"a": 3, "b": 3})
    dest = tmp_path / "out"
    dest.mkdir()
    split_folder(src, dest, per_class=[1, 1])  # an empty folder is fine
    with pytest.raises(TransferlabError, match="out: exists and is not empty"):
        split_folder(src, dest, per_class=[1, 1])
    with pytest.raises(TransferlabError, match="inside the source"):
        split_folder(src, src / "split", per_class=[1, 1])


def test_class_too_small(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"big": 10, "small": 4})
    with pytest.raises(TransferlabError, match=r"class 'small' has 4 images .* 3 \+ 1 \+ 1 = 5"):
        split_folder(src, tmp_path / "out", per_class=[3, 1, 1])
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_bad_options(tmp_path: Path) -> None:
    src = _raw(tmp_path / "raw", {"a": 3, "b": 3})
    for kwargs, message in [
        ({}, "exactly one of"),
        ({"per_class": [1, 1], "fractions": [0.5, 0.5]}, "exactly one of"),
        ({"fractions": [0.7, 0.2, 0.2]}, "sum to at most 1"),
        ({"per_class": [1]}, "2 or 3 numbers"),
        ({"per_class": [2, -1]}, "non-negative"),
    ]:
        with pytest.raises(TransferlabError, match=message):
            split_folder(src, tmp_path / "out", **kwargs)


def test_name_collisions_in_nested_folders_never_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for sub in ("x", "y", "z"):
        make_image(src / "a" / sub / "1.png", (6, 6), seed=ord(sub))
    make_image(src / "a" / "1.png", (6, 6), seed=99)
    for i in range(4):
        make_image(src / "b" / f"{i}.png", (6, 6), seed=i)
    split_folder(src, tmp_path / "out", per_class=[4, 0])
    names = sorted(p.name for p in (tmp_path / "out" / "train" / "a").iterdir())
    assert len(names) == 4 and "1.png" in names
    copied = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*.png")}
    assert len(copied) == 8  # every source file arrived, none overwritten


def test_flat_folder_with_label_regex(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    for label in ("ant", "bee"):
        for i in range(3):
            make_image(src / f"{i}-{label}.png", (6, 6), seed=i)
    counts = split_folder(src, tmp_path / "out", per_class=[2, 1], label_regex=r"-(\w+)\.png$")
    assert counts == {"train": {"ant": 2, "bee": 2}, "val": {"ant": 1, "bee": 1}}
