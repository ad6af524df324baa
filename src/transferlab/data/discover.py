"""Turn whatever the user points at into one index of (path, label, split) rows.

Supported layouts, tried in this order:

1. ``root/{train,val,test}/<class>/...`` ("split_folders"; ``valid``/``validation`` mean val,
   val and test are optional and carved from train when missing),
2. ``root/<class>/...`` ("class_folders"; train/val/test carved automatically),
3. a flat folder whose file names carry the label, like Kaggle's ``cat.123.jpg`` ("file_names";
   also used whenever ``label_regex`` is given),
4. a CSV file with ``path,label[,split]`` columns ("csv").

Carved splits are stratified and reproducible on any machine: per class, files are sorted (by the
number in ``label.N.ext`` names, else by name), shuffled with ``random.Random(seed)`` and sliced
train, val, test, the procedure the shared datasets' MANIFEST uses. Nothing is silently dropped:
skipped files are listed in ``problems``; anything that makes the data unusable is a
:class:`~transferlab.errors.TransferlabError` naming the path and the fix.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import TransferlabError

__all__ = [
    "SPLITS",
    "DatasetIndex",
    "Sample",
    "LabelledFiles",
    "discover",
    "find_cross_split_duplicates",
    "find_duplicates",
    "list_labelled",
    "seeded_order",
]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
_IGNORED_DIRS = frozenset({"__MACOSX"})
_KAGGLE_NAME = re.compile(r"[^.]+\.(\d+)\.[^.]+")
_MAX_LISTED = 5


@dataclass
class Sample:
    """One labelled image. ``path`` is absolute; ``split`` is "train", "val" or "test"."""

    path: str
    label: str
    split: str


@dataclass
class DatasetIndex:
    """Everything later stages need to know about the data, JSON-able for the run folder."""

    root: str
    layout: str
    classes: list[str]
    samples: list[Sample]
    generated_split: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split, in index order (split, class, file order)."""
        return [s for s in self.samples if s.split == name]

    def has_split(self, name: str) -> bool:
        return any(s.split == name for s in self.samples)

    def counts(self) -> dict[str, dict[str, int]]:
        """split → class → number of images, for every split present and every class."""
        tally = Counter((s.split, s.label) for s in self.samples)
        return {
            split: {c: tally[split, c] for c in self.classes}
            for split in SPLITS
            if self.has_split(split)
        }

    def label_index(self, label: str) -> int:
        """Position of ``label`` in ``classes``: the integer target the model is trained on."""
        try:
            return self.classes.index(label)
        except ValueError:
            raise TransferlabError(
                f"unknown class {label!r}; this dataset has classes {', '.join(self.classes)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; sample paths under the root are stored relative to it (portable)."""
        base = _base_dir(self.root, self.layout)
        return {
            "root": self.root,
            "layout": self.layout,
            "classes": list(self.classes),
            "samples": [
                {"path": _relative(s.path, base), "label": s.label, "split": s.split}
                for s in self.samples
            ],
            "generated_split": copy.deepcopy(self.generated_split),
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetIndex:
        base = _base_dir(d["root"], d["layout"])
        return cls(
            root=d["root"],
            layout=d["layout"],
            classes=list(d["classes"]),
            samples=[
                Sample(_absolute(s["path"], base), s["label"], s["split"]) for s in d["samples"]
            ],
            generated_split=d.get("generated_split"),
            problems=list(d.get("problems", [])),
        )


@dataclass
class LabelledFiles:
    """Labelled files found under a source before any split is carved (``split`` may be None)."""

    root: str
    layout: str
    items: list[tuple[str, str, str | None]]  # (absolute path, label, split or None)
    problems: list[str]


def discover(
    source: str | os.PathLike[str],
    *,
    label_regex: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 42,
) -> DatasetIndex:
    """Index a dataset in any supported layout, carving missing val/test splits reproducibly.

    ``val_fraction``/``test_fraction`` are fractions of each class's pool (all files for unsplit
    layouts, the train files when only some splits exist); ``test_fraction=0`` means no test split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise TransferlabError(
            f"val fraction {val_fraction} and test fraction {test_fraction} must each be in [0, 1) "
            "and sum to less than 1"
        )
    found = list_labelled(source, label_regex=label_regex)
    problems = list(found.problems)
    classes = sorted({label for _, label, _ in found.items})
    if len(classes) < 2:
        only = f" {classes[0]!r}" if classes else ""
        raise TransferlabError(
            f"{found.root}: found only one class{only} ({len(found.items)} images); a classifier "
            "needs at least two: add a folder (or file-name label) per class"
        )

    present = {split for _, _, split in found.items if split is not None}
    if present:
        _check_split_classes(found, present, problems)
        carve = [s for s in ("val", "test") if s not in present]
        pool_split: str | None = "train"
    else:
        carve = ["val", "test"]
        pool_split = None
    fractions = {"val": val_fraction, "test": test_fraction}
    carve = [s for s in carve if fractions[s] > 0]

    by_class: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for path, label, split in found.items:
        by_class[label].append((path, split))
    base = _base_dir(found.root, found.layout)
    samples: list[Sample] = []
    for label in classes:
        fixed = [(p, s) for p, s in by_class[label] if s is not None and s != pool_split]
        pool = [p for p, s in by_class[label] if s == pool_split]
        samples += [Sample(p, label, s) for p, s in fixed]
        if not carve:
            samples += [Sample(p, label, "train") for p in pool]
            continue
        counts = _carve_counts(len(pool), [fractions[s] for s in carve])
        if counts is None:
            raise _too_small(found, label, len(pool), pool_split, carve, fractions)
        shuffled = seeded_order(pool, base, seed)
        n_train = len(pool) - sum(counts)
        samples += [Sample(p, label, "train") for p in shuffled[:n_train]]
        start = n_train
        for split, n in zip(carve, counts, strict=True):
            samples += [Sample(p, label, split) for p in shuffled[start : start + n]]
            start += n

    order = {s: i for i, s in enumerate(SPLITS)}
    class_pos = {c: i for i, c in enumerate(classes)}
    samples.sort(key=lambda s: (order[s.split], class_pos[s.label], _file_key(s.path, base)))
    generated = None
    if carve:
        generated = {
            "from": "train" if pool_split else "all",
            "splits": carve,
            "val_fraction": val_fraction if "val" in carve else None,
            "test_fraction": test_fraction if "test" in carve else None,
            "seed": seed,
            "method": "per class: sort (label.N.ext by N, else by name), "
            "random.Random(seed).shuffle, slices train, val, test",
        }
    return DatasetIndex(
        root=found.root,
        layout=found.layout,
        classes=classes,
        samples=samples,
        generated_split=generated,
        problems=problems,
    )


def list_labelled(
    source: str | os.PathLike[str], *, label_regex: str | None = None
) -> LabelledFiles:
    """Find every labelled image under ``source`` (any layout) without carving splits."""
    root = os.path.abspath(os.fspath(source))
    if not os.path.exists(root):
        raise TransferlabError(f"{root}: no such file or folder; check the path")
    if os.path.isfile(root):
        if root.lower().endswith(".csv"):
            return _scan_csv(root)
        raise TransferlabError(
            f"{root}: is a file; point at a folder of images or a .csv with path,label columns"
        )
    problems: list[str] = []
    if label_regex is not None:
        pattern = _compile_label_regex(label_regex)
        files = _walk_images(root, problems)
        items = _labels_from_names(root, files, pattern, problems)
        return LabelledFiles(root, "file_names", items, problems)

    dirs, files = _list_dir(root)
    splits: dict[str, str] = {}
    for d in dirs:
        canonical = _SPLIT_NAMES.get(os.path.basename(d).lower())
        if canonical is None:
            continue
        if canonical in splits:
            raise TransferlabError(
                f"{root}: both {os.path.basename(splits[canonical])!r} and "
                f"{os.path.basename(d)!r} look like the {canonical} split; keep one of them"
            )
        splits[canonical] = d
    if splits:
        if "train" not in splits:
            raise TransferlabError(
                f"{root}: found {', '.join(sorted(splits))} folder(s) but no 'train' folder; "
                "add root/train/<class>/ or put the class folders directly under the root"
            )
        return _scan_split_folders(root, splits, dirs, files, problems)

    items: list[tuple[str, str, str | None]] = []
    class_dirs = []
    for d in dirs:
        images = _walk_images(d, problems)
        if images:
            class_dirs.append(d)
            items += [(p, os.path.basename(d), None) for p in images]
        else:
            problems.append(f"ignored folder with no images: {d}")
    if class_dirs:
        _report_loose_files(files, problems, "image outside a class folder")
        return LabelledFiles(root, "class_folders", items, problems)

    images = _keep_images(files, problems)
    if not images:
        raise TransferlabError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put them in root/<class>/ folders, or name them like cat.1.jpg"
        )
    items = _labels_from_names(root, images, None, problems)
    return LabelledFiles(root, "file_names", items, problems)


def seeded_order(paths: list[str], base: str, seed: int) -> list[str]:
    """The MANIFEST procedure: sort one class's files, then ``random.Random(seed).shuffle``."""
    ordered = sorted(paths, key=lambda p: _file_key(p, base))
    random.Random(seed).shuffle(ordered)
    return ordered


def find_cross_split_duplicates(
    samples: list[Sample], digests: dict[str, str]
) -> list[tuple[Sample, Sample]]:
    """Pairs of byte-identical files in different splits (leakage), earlier split first.

    ``digests`` maps a sample's path to its content hash (:func:`~.images.file_digest`); samples
    without one are skipped, so callers may hash only what they need.
    """
    order = {s: i for i, s in enumerate(SPLITS)}
    pairs = []
    for group in find_duplicates(samples, digests):
        group = sorted(group, key=lambda s: (order.get(s.split, len(order)), s.path))
        for i, a in enumerate(group):
            pairs += [(a, b) for b in group[i + 1 :] if b.split != a.split]
    return pairs


def find_duplicates(samples: list[Sample], digests: dict[str, str]) -> list[list[Sample]]:
    """Groups (2+) of samples with identical content, in any split and with any labels.

    Filter a group by split for within-split repeats; differing labels in one group mean the same
    picture is labelled twice.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        digest = digests.get(s.path)
        if digest is not None:
            groups[digest].append(s)
    return [g for g in groups.values() if len(g) > 1]


# --------------------------------------------------------------------------------------------
# layouts


def _scan_split_folders(
    root: str, splits: dict[str, str], dirs: list[str], files: list[str], problems: list[str]
) -> LabelledFiles:
    for d in dirs:
        if d not in splits.values():
            problems.append(f"ignored folder (not train/val/test): {d}")
    _report_loose_files(files, problems, "image outside a split folder")
    items: list[tuple[str, str, str | None]] = []
    for split in SPLITS:
        if split not in splits:
            continue
        class_dirs, loose = _list_dir(splits[split])
        _report_loose_files(loose, problems, "image outside a class folder")
        for d in class_dirs:
            images = _walk_images(d, problems)
            if not images:
                problems.append(f"ignored folder with no images: {d}")
            items += [(p, os.path.basename(d), split) for p in images]
    if not items:
        raise TransferlabError(
            f"{root}: no images found in {', '.join(sorted(splits.values()))}; "
            "expected root/train/<class>/<image files>"
        )
    return LabelledFiles(root, "split_folders", items, problems)


def _scan_csv(csv_path: str) -> LabelledFiles:
    base = os.path.dirname(csv_path)
    problems: list[str] = []
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            if "path" not in columns or "label" not in columns:
                found = ", ".join(repr(c) for c in columns) or "none"
                raise TransferlabError(
                    f"{csv_path}: needs a header with 'path' and 'label' columns "
                    f"(and optionally 'split'); found columns: {found}"
                )
            rows = [
                (
                    reader.line_num,
                    (row.get(columns["path"]) or "").strip(),
                    (row.get(columns["label"]) or "").strip(),
                    (row.get(columns["split"]) or "").strip() if "split" in columns else None,
                )
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TransferlabError(f"{csv_path}: cannot read the CSV: {exc}") from None

    items: list[tuple[str, str, str | None]] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for line, rel, label, split_value in rows:
        if not rel or not label:
            problems.append(f"{csv_path}:{line}: empty path or label, row skipped")
            continue
        path = os.path.normpath(os.path.join(base, rel))
        if not os.path.isfile(path):
            missing.append(rel)
            continue
        if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            problems.append(f"skipped non-image file: {path}")
            continue
        if path in seen:
            problems.append(f"{csv_path}:{line}: {rel} is already on line {seen[path]}, skipped")
            continue
        seen[path] = line
        split: str | None = None
        if split_value is not None:
            split = _SPLIT_NAMES.get(split_value.lower())
            if split is None:
                raise TransferlabError(
                    f"{csv_path}:{line}: split {split_value!r} is not one of train, val, test; "
                    "fill the split column for every row, or drop the column to split automatically"
                )
        items.append((path, label, split))
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise TransferlabError(
            f"{csv_path}: {len(missing)} row(s) point to missing files: {listed}{more}; "
            f"relative paths are read from the CSV's folder {base}"
        )
    if not items:
        raise TransferlabError(f"{csv_path}: no usable image rows; add rows of path,label")
    return LabelledFiles(csv_path, "csv", items, problems)


def _labels_from_names(
    root: str, files: list[str], pattern: re.Pattern[str] | None, problems: list[str]
) -> list[tuple[str, str, str | None]]:
    """Label each file from its name; unlabelled names go to problems, none labelled is an error."""
    items: list[tuple[str, str, str | None]] = []
    unmatched: list[str] = []
    for path in files:
        label = _name_label(os.path.basename(path), pattern)
        if label:
            items.append((path, label, None))
        else:
            unmatched.append(path)
    examples = ", ".join(os.path.basename(p) for p in unmatched[:3])
    if not items and pattern is not None:
        raise TransferlabError(
            f"{root}: --label-regex {pattern.pattern!r} matched none of the {len(unmatched)} "
            f"image file names (e.g. {examples}); the label is the group named 'label', else "
            "the first group, else the whole match, e.g. '^([a-z]+)_'"
        )
    if not items:
        raise TransferlabError(
            f"{root}: image file names carry no label (e.g. {examples}); name them like "
            "cat.1.jpg, pass --label-regex, or sort them into root/<class>/ folders"
        )
    why = "does not match --label-regex" if pattern is not None else "no label.N.ext label in name"
    problems += [f"skipped file, {why}: {p}" for p in unmatched]
    return items


def _name_label(name: str, pattern: re.Pattern[str] | None) -> str:
    """Kaggle style "cat.12.jpg" → "cat" (text before the first dot, if there are two dots)."""
    if pattern is None:
        stem = os.path.splitext(name)[0]
        return stem.split(".", 1)[0] if "." in stem else ""
    m = pattern.search(name)
    if m is None:
        return ""
    if "label" in pattern.groupindex:
        return m.group("label") or ""
    return (m.group(1) if pattern.groups else m.group(0)) or ""


def _compile_label_regex(label_regex: str) -> re.Pattern[str]:
    try:
        return re.compile(label_regex)
    except re.error as exc:
        raise TransferlabError(
            f"--label-regex {label_regex!r} is not a valid regular expression: {exc}"
        ) from None


# --------------------------------------------------------------------------------------------
# splitting


def _carve_counts(n: int, fractions: list[float]) -> list[int] | None:
    """Per-split sizes carved from a class of ``n`` (at least 1 each, 1+ left for train)."""
    counts = [max(1, math.floor(n * f + 0.5)) for f in fractions]
    return counts if n - sum(counts) >= 1 else None


def _too_small(
    found: LabelledFiles,
    label: str,
    n: int,
    pool_split: str | None,
    carve: list[str],
    fractions: dict[str, float],
) -> TransferlabError:
    where = "in train" if pool_split else "in total"
    shares = " + ".join(f"{fractions[s]:g} {s}" for s in carve)
    return TransferlabError(
        f"{found.root}: class {label!r} has only {n} image(s) {where}, too few to carve "
        f"{' and '.join(carve)} ({shares}); need at least {len(carve) + 1}: add images, "
        "provide val/test folders, or lower the fractions (test fraction 0 = no test split)"
    )


def _check_split_classes(found: LabelledFiles, present: set[str], problems: list[str]) -> None:
    """A class seen in val/test must exist in train; a class missing from val/test is noted."""
    per_split: dict[str, set[str]] = defaultdict(set)
    for _, label, split in found.items:
        per_split[split or "train"].add(label)
    for split in ("val", "test"):
        if split not in present:
            continue
        unknown = sorted(per_split[split] - per_split["train"])
        if unknown:
            raise TransferlabError(
                f"{found.root}: class(es) {', '.join(unknown)} appear in {split} but not in "
                "train; the model cannot learn them: add training images or remove them"
            )
        absent = sorted(per_split["train"] - per_split[split])
        if absent:
            problems.append(f"class(es) with no {split} images: {', '.join(absent)}")


# --------------------------------------------------------------------------------------------
# file system


def _list_dir(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folders, files) of ``folder``, hidden entries skipped, sorted for determinism."""
    dirs, files = [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise TransferlabError(f"{folder}: cannot list folder: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _IGNORED_DIRS:
            continue
        if entry.is_dir():
            dirs.append(entry.path)
        elif entry.is_file():
            files.append(entry.path)
    return dirs, files


def _walk_images(folder: str, problems: list[str]) -> list[str]:
    """All image files under ``folder`` at any depth (symlinked folders followed once)."""
    images: list[str] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        dirs, files = _list_dir(current)
        images += _keep_images(files, problems)
        stack += reversed(dirs)
    return images


def _keep_images(files: list[str], problems: list[str]) -> list[str]:
    images = []
    for path in files:
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            problems.append(f"skipped non-image file: {path}")
    return images


def _report_loose_files(files: list[str], problems: list[str], what: str) -> None:
    for path in _keep_images(files, problems):
        problems.append(f"skipped {what}: {path}")


def _file_key(path: str, base: str) -> tuple[int, int, str, str]:
    """Sort key: Kaggle ids numerically ("cat.2" before "cat.10"), other names as text."""
    name = os.path.basename(path)
    m = _KAGGLE_NAME.fullmatch(name)
    if m:
        return (0, int(m.group(1)), name, _relative(path, base))
    return (1, 0, name, _relative(path, base))


def _base_dir(root: str, layout: str) -> str:
    return os.path.dirname(root) if layout == "csv" else root


def _absolute(stored: str, base: str) -> str:
    """Inverse of :func:`_relative`."""
    return stored if os.path.isabs(stored) else os.path.join(base, *stored.split("/"))


def _relative(path: str, base: str) -> str:
    """``path`` relative to ``base`` with "/" separators, or unchanged when outside ``base``."""
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return path
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return path
    return Path(rel).as_posix()
