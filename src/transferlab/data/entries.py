"""File-system entries that cannot be used, each with the reason: what discovery (and predict's
folder walk) records instead of dropping a path without a word or failing with a traceback."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from transferlab.storage import printable_path

__all__ = ["UNSUPPORTED_EXTENSIONS", "Problems", "entry_problem"]

# Image formats people have in their photo folders that Pillow cannot decode here: reported as
# unusable (and fatal under --strict), never passed over as "not an image".
UNSUPPORTED_EXTENSIONS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".raw", ".cr2", ".cr3", ".nef", ".arw",
     ".dng", ".orf", ".rw2", ".jp2", ".ico", ".tga", ".exr", ".hdr"}
)  # fmt: skip


class Problems(list):
    """The problem lines of a discovery (``list[str]``), plus the paths that could not be used.

    ``unusable`` holds (path, reason) for every path that is there but cannot be read as an
    image (a dangling or looping link, an unreadable folder, an unsupported format);
    ``odd_names`` the kept files whose names are not valid UTF-8. ``--strict`` fails on either.
    """

    def __init__(self, lines: list[str] | None = None) -> None:
        super().__init__(lines or [])
        self.unusable: list[tuple[str, str]] = []
        self.odd_names: list[str] = []

    def append(self, line: str) -> None:
        super().append(printable_path(line))  # lines end up in JSON, HTML and terminals

    def extend(self, lines: Iterable[str]) -> None:
        super().extend(printable_path(line) for line in lines)

    def __iadd__(self, lines: Iterable[str]) -> Problems:  # type: ignore[override]
        self.extend(lines)
        return self

    def skip(self, path: str, reason: str) -> None:
        self.unusable.append((path, reason))
        self.append(f"{reason}: {printable_path(path)}")


def entry_problem(entry: os.DirEntry[str]) -> tuple[str, str | None]:
    """("dir" | "file" | "other", why the entry cannot be used or None), never raising."""
    try:
        if entry.is_dir():
            return "dir", None
        if entry.is_file():
            return "file", None
        if entry.is_symlink():
            os.stat(entry.path)  # raises for a dangling link or a loop
        return "other", None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "other", "symbolic link loop"
        if isinstance(exc, FileNotFoundError) and entry.is_symlink():
            return "other", f"dangling symbolic link (to {printable_path(os.readlink(entry.path))})"
        return "other", f"unreadable ({exc.strerror or exc})"
