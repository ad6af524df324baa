"""Find the labelled images under whatever the user points at, before any split is carved.

Supported layouts, tried in this order:

1. ``root/{train,val,test}/<class>/...`` ("split_folders"; ``valid``/``validation`` mean val,
   val and test are optional and carved from train when missing),
2. ``root/<class>/...`` ("class_folders"; train/val/test carved automatically),
3. a flat folder whose file names carry the label, like Kaggle's ``cat.123.jpg`` ("file_names";
   also used whenever ``label_regex`` is given),
4. a CSV file with ``path,label[,split]`` columns ("csv").

Nothing is silently dropped: skipped files are listed in ``problems``; anything that makes the data
unusable is a :class:`~transferlab.errors.TransferlabError` naming the path and the fix.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

from transferlab.data.entries import UNSUPPORTED_EXTENSIONS, Problems, entry_problem
from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import TransferlabError
from transferlab.storage import printable_path

__all__ = ["SPLITS", "LabelledFiles", "list_labelled"]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
_IGNORED_DIRS = frozenset({"__MACOSX"})
_MAX_LISTED = 5

Item = tuple[str, str, str | None]  # (absolute path, label, split or None)


@dataclass
class LabelledFiles:
    """Labelled files found under a source before any split is carved (``split`` may be None)."""

    root: str
    layout: str
    items: list[Item]
    problems: list[str]


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
    problems = Problems()
    if label_regex is not None:
        pattern = _compile_label_regex(label_regex)
        files = _walk_images(root, problems)
        items = _labels_from_names(root, files, pattern, problems)
        return LabelledFiles(root, "file_names", items, problems)

    dirs, files = _list_dir(root, problems)
    if problems.unusable and problems.unusable[0][0] == root:
        raise TransferlabError(f"{printable_path(root)}: {problems.unusable[0][1]}")
    splits = _split_dirs(root, dirs)
    if splits:
        return _scan_split_folders(root, splits, dirs, files, problems)
    found = _scan_class_folders(root, dirs, files, problems)
    if found is not None:
        return found
    images = _keep_images(files, problems)
    if not images:
        raise TransferlabError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put them in root/<class>/ folders, or name them like cat.1.jpg"
        )
    items = _labels_from_names(root, images, None, problems)
    return LabelledFiles(root, "file_names", items, problems)


def _split_dirs(root: str, dirs: list[str]) -> dict[str, str]:
    """Canonical split name → the folder under ``root`` that holds it (empty: no split folders)."""
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
    if splits and "train" not in splits:
        raise TransferlabError(
            f"{root}: found {', '.join(sorted(splits))} folder(s) but no 'train' folder; "
            "add root/train/<class>/ or put the class folders directly under the root"
        )
    return splits


# --------------------------------------------------------------------------------------------
# layouts


def _scan_split_folders(
    root: str, splits: dict[str, str], dirs: list[str], files: list[str], problems: Problems
) -> LabelledFiles:
    for d in dirs:
        if d not in splits.values():
            problems.append(f"ignored folder (not train/val/test): {d}")
    _report_loose_files(files, problems, "image outside a split folder")
    items: list[Item] = []
    loose_images = 0
    for split in SPLITS:
        if split not in splits:
            continue
        class_dirs, loose = _list_dir(splits[split], problems)
        _report_loose_files(loose, problems, "image outside a class folder")
        loose_images += len(loose)
        for d in class_dirs:
            images = _walk_images(d, problems)
            if not images:
                problems.append(f"ignored folder with no images: {d}")
            items += [(p, os.path.basename(d), split) for p in images]
    if not items:
        others = sorted(os.path.basename(d) for d in dirs if d not in splits.values())
        hint = ""
        if loose_images and others:  # root/{bus,car,train}/: a class named like a split
            names = ", ".join(os.path.basename(d) for d in splits.values())
            hint = (
                f"; {names} holds images, not class folders: if it is a class beside "
                f"{', '.join(others)}, rename it (a class folder cannot be named train, val or "
                "test) or list the images in a CSV of path,label"
            )
        raise TransferlabError(
            f"{root}: no images found in {', '.join(sorted(splits.values()))}; "
            f"expected root/train/<class>/<image files>{hint}"
        )
    return LabelledFiles(root, "split_folders", items, problems)


def _scan_class_folders(
    root: str, dirs: list[str], files: list[str], problems: Problems
) -> LabelledFiles | None:
    """``root/<class>/...``, or None when no sub-folder holds an image."""
    items: list[Item] = []
    class_dirs = []
    for d in dirs:
        images = _walk_images(d, problems)
        if images:
            class_dirs.append(d)
            items += [(p, os.path.basename(d), None) for p in images]
        else:
            problems.append(f"ignored folder with no images: {d}")
    if not class_dirs:
        return None
    _report_loose_files(files, problems, "image outside a class folder")
    return LabelledFiles(root, "class_folders", items, problems)


def _scan_csv(csv_path: str) -> LabelledFiles:
    base = os.path.dirname(csv_path)
    problems = Problems()
    items: list[Item] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for line, rel, label, split_value in _read_csv_rows(csv_path):
        if not rel or not label:
            problems.append(f"{csv_path}:{line}: empty path or label, row skipped")
            continue
        path = os.path.normpath(os.path.join(base, rel))
        if not os.path.isfile(path):
            missing.append(rel)
            continue
        if not _keep_images([path], problems):
            continue
        if path in seen:
            problems.append(f"{csv_path}:{line}: {rel} is already on line {seen[path]}, skipped")
            continue
        seen[path] = line
        items.append((path, label, _csv_split(csv_path, line, split_value)))
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


def _read_csv_rows(csv_path: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, path, label, split or None without a split column) for every row."""
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
            return [
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


def _csv_split(csv_path: str, line: int, split_value: str | None) -> str | None:
    if split_value is None:
        return None
    split = _SPLIT_NAMES.get(split_value.lower())
    if split is None:
        raise TransferlabError(
            f"{csv_path}:{line}: split {split_value!r} is not one of train, val, test; "
            "fill the split column for every row, or drop the column to split automatically"
        )
    return split


def _labels_from_names(
    root: str, files: list[str], pattern: re.Pattern[str] | None, problems: list[str]
) -> list[Item]:
    """Label each file from its name; unlabelled names go to problems, none labelled is an error."""
    items: list[Item] = []
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
# file system


def _list_dir(folder: str, problems: Problems | None = None) -> tuple[list[str], list[str]]:
    """(sub-folders, files) of ``folder``, hidden entries skipped, sorted for determinism.

    Without ``problems`` an unlistable folder is an error; with it, the folder and every entry
    that cannot be used (dangling or looping link, unreadable) is recorded there and skipped.
    """
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        if problems is None:
            raise TransferlabError(
                f"{printable_path(folder)}: cannot list folder: {exc.strerror or exc}"
            ) from None
        problems.skip(folder, f"unreadable folder ({exc.strerror or exc})")
        return [], []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _IGNORED_DIRS:
            continue
        kind, reason = entry_problem(entry)
        if reason is not None:
            if problems is None:
                raise TransferlabError(f"{printable_path(entry.path)}: {reason}")
            problems.skip(entry.path, reason)
        elif kind == "dir":
            dirs.append(entry.path)
        elif kind == "file":
            files.append(entry.path)
            if problems is not None and printable_path(entry.name) != entry.name:
                problems.odd_names.append(entry.path)
                problems.append(
                    f"file name is not valid UTF-8 (kept, shown with \\x escapes): "
                    f"{printable_path(entry.path)}"
                )
    return dirs, files


def _walk_images(folder: str, problems: Problems) -> list[str]:
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
        dirs, files = _list_dir(current, problems)
        images += _keep_images(files, problems)
        stack += reversed(dirs)
    return images


def _keep_images(files: list[str], problems: list[str]) -> list[str]:
    images = []
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif ext in UNSUPPORTED_EXTENSIONS and isinstance(problems, Problems):
            problems.skip(path, f"unsupported image format {ext} (convert it to JPEG or PNG)")
        else:
            problems.append(f"skipped non-image file: {printable_path(path)}")
    return images


def _report_loose_files(files: list[str], problems: list[str], what: str) -> None:
    for path in _keep_images(files, problems):
        problems.append(f"skipped {what}: {path}")
