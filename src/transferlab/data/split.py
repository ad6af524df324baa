"""``transferlab split``: materialise a reproducible train/val/test folder tree from raw images.

The source may be in any layout :func:`~transferlab.data.discover.list_labelled` understands. All
of a class's files are pooled (existing splits are ignored), put in the MANIFEST order (sort, then
``random.Random(seed).shuffle``) and cut into consecutive slices train, val, test. The source is
only ever read: files are copied (or hard-linked), never moved.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from transferlab.data.discover import seeded_order
from transferlab.data.layouts import SPLITS, list_labelled
from transferlab.data.scan import scan_files
from transferlab.errors import TransferlabError
from transferlab.progress import progress
from transferlab.storage import printable_path

__all__ = ["split_folder"]

log = logging.getLogger(__name__)

# Hard links that fail with these fall back to copying (other file system, or no link support).
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


def split_folder(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    per_class: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    seed: int = 42,
    link: bool = False,
    label_regex: str | None = None,
) -> dict[str, dict[str, int]]:
    """Write ``dest/{train,val[,test]}/<class>/`` from ``source``; return split → class → count.

    Give exactly one of ``per_class`` (e.g. ``(350, 150, 150)``: images per class per split) or
    ``fractions`` (e.g. ``(0.7, 0.15, 0.15)``, summing to at most 1; when they sum to 1 rounding
    leftovers go to train). ``link=True`` hard-links instead of copying, falling back to a copy
    (with a logged note) where the file system cannot link. ``dest`` must not exist or be empty.
    """
    if (per_class is None) == (fractions is None):
        raise TransferlabError("give exactly one of --per-class N,N[,N] or --fractions F,F[,F]")
    sizes = _validate(per_class if per_class is not None else fractions, per_class is not None)
    src_root = os.path.abspath(os.fspath(source))
    dest_root = os.path.abspath(os.fspath(dest))
    _check_dest(src_root, dest_root)

    found = list_labelled(src_root, label_regex=label_regex)
    for problem in found.problems:
        log.warning("%s", problem)
    pools: dict[str, list[str]] = defaultdict(list)
    for path, label in _usable(found.items):
        pools[label].append(path)
    base = os.path.dirname(found.root) if found.layout == "csv" else found.root
    splits = SPLITS[: len(sizes)]

    plan: list[tuple[str, str, str]] = []  # (source path, split, class)
    counts: dict[str, dict[str, int]] = {s: {} for s in splits}
    for label in sorted(pools):
        pool = pools[label]
        wanted = _slice_sizes(len(pool), sizes, per_class is not None)
        if sum(wanted) > len(pool) or any(
            n == 0 and f > 0 for n, f in zip(wanted, sizes, strict=True)
        ):
            raise TransferlabError(
                f"class {label!r} has {len(pool)} images but the split needs "
                f"{' + '.join(map(str, wanted))} = {sum(wanted)} (at least 1 per split); "
                "lower --per-class / --fractions or add images"
            )
        start = 0
        ordered = seeded_order(pool, base, seed)
        for split, n in zip(splits, wanted, strict=True):
            plan += [(p, split, label) for p in ordered[start : start + n]]
            counts[split][label] = n
            start += n

    _materialise(plan, base, dest_root, link)
    return {s: c for s, c in counts.items() if any(c.values())}


def _usable(items: Sequence[tuple[str, str, str | None]]) -> list[tuple[str, str]]:
    """(path, label) of the files fit can use, the others reported: the counts asked for are
    then the counts fit trains on."""
    paths = [path for path, _, _ in items]
    with progress(len(paths), "checking images") as advance:
        failures = dict(scan_files(paths, on_progress=advance).failures)
    if failures:
        lines = "".join(f"\n  {printable_path(paths[i])}: {why}" for i, why in failures.items())
        log.warning("skipped %d unusable file(s), not placed in any split:%s", len(failures), lines)
    return [(path, label) for i, (path, label, _) in enumerate(items) if i not in failures]


def _validate(values: Sequence[float], integers: bool) -> list[float]:
    option = "--per-class" if integers else "--fractions"
    sizes = list(values)
    if len(sizes) not in (2, 3):
        raise TransferlabError(f"{option} takes 2 or 3 numbers (train,val[,test]), got {values}")
    if any(v < 0 or not math.isfinite(v) for v in sizes):
        raise TransferlabError(f"{option} values must be non-negative, got {values}")
    if integers and any(int(v) != v for v in sizes):
        raise TransferlabError(f"{option} values must be whole numbers, got {values}")
    if not integers and sum(sizes) > 1 + 1e-9:
        raise TransferlabError(f"{option} must sum to at most 1, got {values} = {sum(sizes):g}")
    if sizes[0] == 0:
        raise TransferlabError(f"{option}: the train share must be above 0, got {values}")
    return sizes


def _slice_sizes(n: int, sizes: list[float], integers: bool) -> list[int]:
    if integers:
        return [int(v) for v in sizes]
    counts = [math.floor(n * f + 0.5) for f in sizes]
    if abs(sum(sizes) - 1) <= 1e-9:
        counts[0] = n - sum(counts[1:])  # everything is used: train takes the rounding leftovers
    return counts


def _check_dest(src_root: str, dest_root: str) -> None:
    if os.path.exists(dest_root):
        if not os.path.isdir(dest_root):
            raise TransferlabError(f"{dest_root}: exists and is a file; choose a new folder")
        if any(os.scandir(dest_root)):
            raise TransferlabError(
                f"{dest_root}: exists and is not empty; choose a new folder or empty it first"
            )
    src, dst = Path(os.path.realpath(src_root)), Path(os.path.realpath(dest_root))
    if dst == src or src in dst.parents:
        raise TransferlabError(
            f"{dest_root}: is inside the source {src_root}; choose a folder outside it"
        )


def _materialise(plan: list[tuple[str, str, str]], base: str, dest_root: str, link: bool) -> None:
    """Copy or link every planned file; names colliding in one folder get their sub-folder path."""
    used: dict[str, set[str]] = defaultdict(set)
    copied_instead = 0
    for src, split, label in sorted(plan, key=lambda t: (t[1], t[2], t[0])):
        folder = os.path.join(dest_root, split, label)
        name = _free_name(src, base, used[folder])
        target = os.path.join(folder, name)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise TransferlabError(
                f"{printable_path(folder)}: cannot create folder ({exc.strerror or exc})"
            ) from None
        if link:
            try:
                os.link(src, target)
                continue
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise TransferlabError(
                        f"{printable_path(target)}: cannot link {printable_path(src)}: "
                        f"{exc.strerror or exc}"
                    ) from None
                copied_instead += 1
        try:
            shutil.copy2(src, target)
        except OSError as exc:
            # A half-copied image must not stay behind for a later `fit` to pick up.
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise TransferlabError(
                f"{printable_path(target)}: cannot copy {printable_path(src)}: "
                f"{exc.strerror or exc}; free disk space or fix permissions, then split again "
                "into an empty folder"
            ) from None
    if copied_instead:
        log.warning(
            "hard links are not possible from the source to %s (another device or file system); "
            "copied %d file(s) instead",
            dest_root,
            copied_instead,
        )


def _free_name(src: str, base: str, used: set[str]) -> str:
    """The file's own name, else prefixed with its sub-folders, else numbered; never overwrites.

    Compared case-insensitively, so the tree is also safe to copy to macOS/Windows disks.
    """
    name = os.path.basename(src)
    try:
        rel_dir = Path(os.path.relpath(os.path.dirname(src), base))
    except ValueError:  # another drive on Windows
        rel_dir = Path(os.path.dirname(src))
    parts = [p for p in rel_dir.parts if p not in (".", "..", rel_dir.anchor)]
    prefix = "_".join(parts) + "_" if parts else ""
    stem, ext = os.path.splitext(name)
    for candidate in (name, prefix + name):
        if candidate.lower() not in used:
            used.add(candidate.lower())
            return candidate
    number = 2
    while f"{prefix}{stem}-{number}{ext}".lower() in used:
        number += 1
    candidate = f"{prefix}{stem}-{number}{ext}"
    used.add(candidate.lower())
    return candidate
