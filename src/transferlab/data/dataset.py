"""A map-style dataset of image files for the training engine (decode + transform per item).

Files were decoded once by the scan before training, and the unusable ones were reported and
excluded there; a file that fails *here* changed during the run. It is reported by name, from the
main process: DataLoader workers re-raise exceptions as a generic RuntimeError wrapping a
traceback, so with ``defer_errors=True`` a worker hands the failure back as data
(:class:`DecodeFailure`) and :func:`raise_if_failed` raises the real :class:`ImageError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from transferlab.data.images import MAX_PIXELS, open_rgb
from transferlab.errors import ImageError

__all__ = ["DecodeFailure", "ImageDataset", "collate", "raise_if_failed"]


@dataclass(frozen=True)
class DecodeFailure:
    """An image that could not be used, carried back from a worker as data."""

    path: str
    reason: str


class ImageDataset(Dataset):
    """``(transform(image), label)`` per file; ``label`` is an int64 scalar tensor.

    ``draft`` is the smallest (w, h) the transform needs: JPEGs are decoded at a reduced scale that
    never goes below it (see ``open_rgb``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = MAX_PIXELS,
        *,
        draft: tuple[int, int] | None = None,
        defer_errors: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft = draft
        self.defer_errors = defer_errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | DecodeFailure:
        path = self.paths[index]
        try:
            image = open_rgb(path, max_pixels=self.max_pixels, draft=self.draft)
            return self.transform(image), self.labels[index]
        except ImageError as e:
            failure = DecodeFailure(
                path,
                f"{e.reason} (it decoded when the data was checked: "
                "did the file change during the run?)",
            )
        if self.defer_errors:
            return failure
        raise ImageError(failure.path, failure.reason)


def collate(items: list[Any]) -> Any:
    """``default_collate``, except that a batch holding a failure becomes that failure."""
    for item in items:
        if isinstance(item, DecodeFailure):
            return item
    return default_collate(items)


def raise_if_failed(batch: Any) -> None:
    """Raise the :class:`ImageError` a worker handed back (call on every batch)."""
    if isinstance(batch, DecodeFailure):
        raise ImageError(batch.path, batch.reason)
