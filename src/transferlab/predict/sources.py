"""What to predict: files, folders and globs, walked lazily so memory stays flat on any tree."""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence

from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import TransferlabError
from transferlab.progress import warn

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
            for m in glob.iglob(src, recursive=True):
                if os.path.isfile(m):
                    matched = True
                    yield m
            if not matched:
                warn(f"{src}: the pattern matches no file")


def _walk(root: str) -> Iterator[str]:
    """Image files under ``root``, depth first, holding one open directory per level."""
    stack = [os.scandir(root)]
    try:
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop().close()
                continue
            if entry.name.startswith("."):
                continue
            try:
                # Symlinked folders are not entered (like Path.rglob): a link to a parent would
                # loop forever. Symlinked files are followed.
                if entry.is_dir(follow_symlinks=False):
                    stack.append(os.scandir(entry.path))
                elif (
                    entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                ):
                    yield entry.path
            except OSError:
                continue  # an unreadable sub-folder or a dangling link: nothing to predict there
    finally:
        for it in stack:
            it.close()


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size``, never holding more than one list."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
