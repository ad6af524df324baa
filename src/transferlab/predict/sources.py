"""What to predict: files, folders and globs, walked lazily so memory stays flat on any tree."""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence

from transferlab.data.entries import UNSUPPORTED_EXTENSIONS, entry_problem
from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import TransferlabError
from transferlab.progress import warn
from transferlab.storage import printable_path

__all__ = ["Sources", "chunks", "iter_sources"]

Sources = Sequence[str | os.PathLike[str]] | str | os.PathLike[str]


def iter_sources(sources: Sources) -> Iterator[str]:
    """Files as given, folders recursively (image extensions, no hidden files), globs expanded.

    Every source is checked up front (a typo fails before hours of work, not after); the files
    themselves are produced lazily, one directory entry at a time.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    plan: list[tuple[str, str]] = []
    for src in map(os.fspath, sources):
        if os.path.isdir(src):
            plan.append(("dir", src))
        elif os.path.isfile(src):
            plan.append(("file", src))
        elif glob.has_magic(src):
            plan.append(("glob", src))
        else:
            raise TransferlabError(f"{src}: no such file or folder")
    return _iter_plan(plan)  # a generator: nothing is listed until the caller asks


def _iter_plan(plan: list[tuple[str, str]]) -> Iterator[str]:
    for kind, src in plan:
        if kind == "file":
            yield src
        elif kind == "dir":
            yield from _walk(src)
        else:
            matched = False
            for m in sorted(glob.iglob(src, recursive=True)):
                if os.path.isfile(m):
                    matched = True
                    yield m
            if not matched:
                warn(f"{src}: the pattern matches no file")


def _walk(root: str) -> Iterator[str]:
    """Image files under ``root``, depth first, each folder in name order (the same order on
    every filesystem and run), holding one folder's listing per level in memory.

    Every path that cannot be predicted is named on stderr with the reason (dangling or looping
    link, unreadable folder, unsupported image format), never dropped without a word.
    """
    stack = [_listing(root)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        path = _walk_entry(entry)
        if path == _DESCEND:
            stack.append(_listing(entry.path))
        elif path is not None:
            yield path


def _listing(folder: str) -> Iterator[os.DirEntry[str]]:
    """The folder's entries sorted by name; an unreadable folder is said, and is empty."""
    entries: list[os.DirEntry[str]] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                entries.append(entry)
    except OSError as exc:
        what = "listing stopped" if entries else "unreadable folder"
        warn(f"{printable_path(folder)}: {what} ({exc.strerror or exc})")
    return iter(sorted(entries, key=lambda e: e.name))


_DESCEND = "\0descend"


def _walk_entry(entry: os.DirEntry[str]) -> str | None:
    """The entry's path when it is an image to predict, ``_DESCEND`` for a folder, else None."""
    # Symlinked folders are not entered (like Path.rglob): a link to a parent would loop
    # forever. Symlinked files are followed.
    try:
        if entry.is_dir(follow_symlinks=False):
            return _DESCEND
    except OSError:
        pass
    kind, reason = entry_problem(entry)
    ext = os.path.splitext(entry.name)[1].lower()
    if reason is None and kind == "file" and ext in UNSUPPORTED_EXTENSIONS:
        reason = f"unsupported image format {ext} (convert it to JPEG or PNG)"
    if reason is not None:
        warn(f"{printable_path(entry.path)}: {reason}, not predicted")
        return None
    if kind == "file" and ext in IMAGE_EXTENSIONS:
        return entry.path
    return None


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size``, never holding more than one list."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
