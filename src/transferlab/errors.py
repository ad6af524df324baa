"""One exception type for everything a user can cause.

The CLI prints these as a one-line message (no traceback); anything else is a bug.
"""

from __future__ import annotations


class TransferlabError(Exception):
    """A problem the user can fix: bad path, bad option, unreadable data, missing weights.

    The message must name the file or option and say what to do instead.
    """


class ImageError(TransferlabError):
    """An image file that cannot be used (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes despite the 2-arg constructor
        return (ImageError, (self.path, self.reason))
