"""Layouts → one index; reproducible stratified splits; problems listed; clear errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import TINY_COLOURS, TINY_COUNTS, make_image
from transferlab.data.discover import (
    DatasetIndex,
    Sample,
    discover,
    find_cross_split_duplicates,
    find_duplicates,
    seeded_order,
)
from transferlab.data.images import file_digest
from transferlab.errors import TransferlabError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _class_folders(root: Path, sizes: dict[str, int], ext: str = ".png") -> Path:
    for label, n in sizes.items():
        colour = TINY_COLOURS.get(label, (90, 160, 90))
        for i in range(n):
            make_image(root / label / f"{label}.{i}{ext}", (8, 8), color=colour, seed=i)
    return root


def _assignment(index: DatasetIndex) -> dict[str, str]:
    return {Path(s.path).name: s.split for s in index.samples}


# ---------------------------------------------------------------------------------------------
# layouts


def test_split_folders(tiny_dataset: Path) -> None:
    index = discover(tiny_dataset)
    assert index.layout == "split_folders"
    assert index.classes == ["a", "b"]
    assert index.counts() == {s: {"a": n, "b": n} for s, n in TINY_COUNTS.items()}
    assert index.generated_split is None
    assert index.problems == []
    assert all(
        Path(s.path).is_absolute() and Path(s.path).parent.name == s.label for s in index.samples
    )
    assert [s.split for s in index.samples] == sorted(
        (s.split for s in index.samples), key=["train", "val", "test"].index
    )


def test_valid_is_val_and_missing_test_is_carved(tiny_dataset: Path) -> None:
    shutil.rmtree(tiny_dataset / "test")
    (tiny_dataset / "val").rename(tiny_dataset / "valid")
    index = discover(tiny_dataset, test_fraction=0.25)
    counts = index.counts()
    assert counts["val"] == {"a": 2, "b": 2}
    assert counts["train"] == {"a": 3, "b": 3} and counts["test"] == {"a": 1, "b": 1}
    assert index.generated_split["from"] == "train"
    assert index.generated_split["splits"] == ["test"]
    assert index.generated_split["seed"] == 42


def test_test_fraction_zero_means_no_test_split(tiny_dataset: Path) -> None:
    shutil.rmtree(tiny_dataset / "test")
    index = discover(tiny_dataset, test_fraction=0)
    assert not index.has_split("test") and index.generated_split is None
    assert set(index.counts()) == {"train", "val"}


def test_only_train_carves_val_and_test(tiny_dataset: Path) -> None:
    shutil.rmtree(tiny_dataset / "val")
    shutil.rmtree(tiny_dataset / "test")
    index = discover(tiny_dataset, val_fraction=0.25, test_fraction=0.25)
    assert index.counts() == {
        s: {"a": n, "b": n} for s, n in (("train", 2), ("val", 1), ("test", 1))
    }
    assert index.generated_split["splits"] == ["val", "test"]


def test_class_folders_split_stratified_and_seeded(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"a": 10, "b": 20})
    index = discover(root)
    assert index.layout == "class_folders"
    assert index.counts() == {
        "train": {"a": 6, "b": 12},
        "val": {"a": 2, "b": 4},
        "test": {"a": 2, "b": 4},
    }
    assert index.generated_split["from"] == "all"
    assert _assignment(discover(root, seed=42)) == _assignment(index)
    assert _assignment(discover(root, seed=7)) != _assignment(index)


def test_carved_split_follows_the_manifest_procedure(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"a": 12, "b": 5})
    index = discover(root, val_fraction=0.25, test_fraction=0.25)
    # Sort numerically by id (a.2 before a.10), Random(seed).shuffle, slice train, val, test.
    names = [f"a.{i}.png" for i in range(12)]
    random.Random(42).shuffle(names)
    got = [Path(s.path).name for s in index.samples if s.label == "a"]
    expected = {"train": names[:6], "val": names[6:9], "test": names[9:]}
    for split, wanted in expected.items():
        assert sorted(n for n in got if _assignment(index)[n] == split) == sorted(wanted)


def test_seeded_order_sorts_kaggle_ids_numerically(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"cat.{i}.jpg") for i in (10, 2, 1)]
    ordered = [str(tmp_path / f"cat.{i}.jpg") for i in (1, 2, 10)]
    random.Random(3).shuffle(ordered)
    assert seeded_order(paths, str(tmp_path), 3) == ordered


def test_nested_folders_unicode_and_hidden_files(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    make_image(root / "a" / "deeper" / "still" / "ünï_猫.png", (8, 8))
    make_image(root / "b" / ".hidden.png", (8, 8))
    make_image(root / ".cache" / "x.png", (8, 8))
    index = discover(root, val_fraction=0.25, test_fraction=0.25)
    names = {Path(s.path).name for s in index.samples}
    assert "ünï_猫.png" in names
    assert ".hidden.png" not in names and "x.png" not in names
    assert index.problems == []


def test_non_image_files_are_reported_not_dropped_silently(tiny_dataset: Path) -> None:
    (tiny_dataset / "README.txt").write_text("hi")
    (tiny_dataset / "train" / "a" / "notes.docx").write_text("x")
    index = discover(tiny_dataset)
    assert f"skipped non-image file: {tiny_dataset / 'README.txt'}" in index.problems
    assert (
        f"skipped non-image file: {tiny_dataset / 'train' / 'a' / 'notes.docx'}" in index.problems
    )
    assert index.counts()["train"] == {"a": 4, "b": 4}


def test_flat_kaggle_names(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for label in ("cat", "dog"):
        for i in range(5):
            make_image(root / f"{label}.{i}.jpg", (8, 8), seed=i)
    make_image(root / "unlabelled.jpg", (8, 8))
    index = discover(root)
    assert index.layout == "file_names"
    assert index.classes == ["cat", "dog"]
    assert sum(index.counts()["train"].values()) == 6
    assert any("unlabelled.jpg" in p for p in index.problems)


def test_label_regex_first_group_and_named_group(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for label in ("ant", "bee"):
        for i in range(5):
            make_image(root / f"img_{i}_{label}.png", (8, 8), seed=i)
    make_image(root / "other.png", (8, 8))
    first = discover(root, label_regex=r"_([a-z]+)\.png$")
    named = discover(root, label_regex=r"^img_(\d+)_(?P<label>[a-z]+)")
    assert first.classes == named.classes == ["ant", "bee"]
    assert _assignment(first) == _assignment(named)
    assert any("does not match --label-regex" in p and "other.png" in p for p in first.problems)


def test_label_regex_matching_nothing(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    with pytest.raises(
        TransferlabError, match=r"--label-regex '\^zzz\(\.\)' matched none of the 6"
    ):
        discover(root, label_regex="^zzz(.)")
    with pytest.raises(TransferlabError, match="not a valid regular expression"):
        discover(root, label_regex="(")


def test_csv_with_and_without_split(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "imgs", {"a": 4, "b": 4})
    rows = sorted(root.rglob("*.png"))
    plain = tmp_path / "labels.csv"
    plain.write_text(
        "path,label\n" + "".join(f"imgs/{p.parent.name}/{p.name},{p.parent.name}\n" for p in rows)
    )
    index = discover(plain, val_fraction=0.25, test_fraction=0.25)
    assert index.layout == "csv" and index.classes == ["a", "b"]
    assert index.counts()["train"] == {"a": 2, "b": 2}

    split = tmp_path / "sub" / "with_split.csv"
    split.parent.mkdir()
    lines = [
        f"{p},{p.parent.name},{'train' if i % 4 else 'validation'}" for i, p in enumerate(rows)
    ]
    split.write_text("Path,Label,Split\n" + "\n".join(lines) + "\n")  # absolute paths
    index = discover(split, test_fraction=0)
    assert index.counts() == {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}}
    again = DatasetIndex.from_dict(json.loads(json.dumps(index.to_dict())))
    assert again == index


def test_csv_errors(tmp_path: Path) -> None:
    bad_columns = tmp_path / "cols.csv"
    bad_columns.write_text("file,class\nx.png,a\n")
    with pytest.raises(
        TransferlabError, match="'path' and 'label' columns.*found columns: 'file', 'class'"
    ):
        discover(bad_columns)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\n" + "".join(f"gone{i}.png,a\n" for i in range(7)))
    with pytest.raises(TransferlabError) as info:
        discover(missing)
    message = str(info.value)
    assert "7 row(s) point to missing files: gone0.png" in message
    assert "gone4.png and 2 more" in message and "gone5.png" not in message
    assert str(tmp_path) in message


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TransferlabError, match=r"nowhere: no such file or folder; check the path"):
        discover(tmp_path / "nowhere")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(TransferlabError, match=r"no images found \(looked for .*\.jpg"):
        discover(tmp_path / "docs")


def test_jfif_and_jpe_files_are_jpegs_too(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"cat": 3, "dog": 3}, ext=".jpg")
    for i, ext in enumerate((".jfif", ".jpe")):
        (root / "cat" / f"cat.{i}.jpg").rename(root / "cat" / f"cat.{i}{ext}")
    index = discover(root)
    assert sorted(Path(s.path).suffix for s in index.samples if s.label == "cat") == [
        ".jfif", ".jpe", ".jpg"
    ]  # fmt: skip


def test_a_class_named_like_a_split_says_why_it_fails(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "vehicles", {"bus": 3, "car": 3, "train": 3})
    with pytest.raises(TransferlabError) as err:
        discover(root)
    message = str(err.value)
    assert "train holds images, not class folders" in message
    assert "beside bus, car" in message and "CSV" in message


def test_single_class(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"only": 5})
    with pytest.raises(TransferlabError, match=r"only one class 'only' \(5 images\).*at least two"):
        discover(root)


def test_class_too_small_to_split(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "raw", {"a": 10, "rare": 2})
    with pytest.raises(TransferlabError, match=r"class 'rare' has only 2 image\(s\).*at least 3"):
        discover(root)
    assert discover(root, test_fraction=0).counts()["val"] == {"a": 2, "rare": 1}


def test_val_class_missing_from_train(tiny_dataset: Path) -> None:
    make_image(tiny_dataset / "val" / "c" / "c.png", (8, 8))
    with pytest.raises(TransferlabError, match=r"class\(es\) c appear in val but not in train"):
        discover(tiny_dataset)


def test_bad_fractions(tiny_dataset: Path) -> None:
    with pytest.raises(TransferlabError, match="sum to less than 1"):
        discover(tiny_dataset, val_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# index helpers and leakage


def test_index_helpers(tiny_dataset: Path) -> None:
    index = discover(tiny_dataset)
    assert index.label_index("b") == 1
    with pytest.raises(TransferlabError, match="unknown class 'zebra'"):
        index.label_index("zebra")
    assert len(index.split("val")) == 4 and index.has_split("test")
    d = index.to_dict()
    assert d["samples"][0]["path"] == "train/a/a_train_0.jpg"  # relative: portable run records
    assert DatasetIndex.from_dict(json.loads(json.dumps(d))) == index


def test_cross_split_duplicates(tiny_dataset: Path) -> None:
    leaked = tiny_dataset / "test" / "a" / "copy_of_train.jpg"
    shutil.copy(tiny_dataset / "train" / "a" / "a_train_0.jpg", leaked)
    shutil.copy(leaked, tiny_dataset / "test" / "b" / "same_in_test.jpg")
    index = discover(tiny_dataset)
    digests = {s.path: file_digest(s.path) for s in index.samples}
    pairs = find_cross_split_duplicates(index.samples, digests)
    assert {(a.split, Path(a.path).name, b.split) for a, b in pairs} == {
        ("train", "a_train_0.jpg", "test")
    }
    assert len(pairs) == 2  # train copy vs each of the two test copies, not test vs test
    groups = find_duplicates(index.samples, digests)
    assert len(groups) == 1 and len(groups[0]) == 3


def test_duplicates_ignore_samples_without_digest() -> None:
    a, b = Sample("/x/1.png", "a", "train"), Sample("/x/2.png", "a", "test")
    assert find_cross_split_duplicates([a, b], {"/x/1.png": "d"}) == []


@pytest.mark.shared
def test_shared_cats_vs_dogs_small() -> None:
    root = SHARED / "datasets" / "cats_vs_dogs_small"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (../shared relative to the repository)")
    index = discover(root)
    assert index.layout == "split_folders" and index.classes == ["cat", "dog"]
    assert index.counts() == {
        "train": {"cat": 350, "dog": 350},
        "val": {"cat": 150, "dog": 150},
        "test": {"cat": 150, "dog": 150},
    }
    assert index.problems == [] and index.generated_split is None
