"""A map-style dataset of image files for the training engine (decode + transform per item).

Files were decoded once by the scan before training, and the unusable ones were reported and
excluded there; a file that fails *here* changed during the run. It is reported by name, from the
main process: DataLoader workers re-raise exceptions as a generic RuntimeError wrapping a
traceback, so with ``defer_errors=True`` a worker hands the failure back as data
(:class:`DecodeFailure`) and :func:`raise_if_failed` raises the real :class:`ImageError`.

Random augmentation is reproducible whatever the number of DataLoader workers: with a ``seed``,
each item's transform runs on a private torch RNG stream seeded by :func:`item_seed` ``(seed,
epoch, index)`` (``torch.random.fork_rng``: the caller's and the worker's global state are left
untouched), so an item's augmented view does not depend on which process, worker or batch
computes it, or on what ran before it. torchvision's v2 transforms draw from torch's global RNG
only (not Python's ``random`` nor NumPy's), so seeding torch is enough. ``set_epoch`` writes the
epoch into a shared-memory tensor that every worker process reads (persistent workers included);
call it before iterating an epoch.
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

__all__ = ["DecodeFailure", "ImageDataset", "collate", "item_seed", "raise_if_failed"]


@dataclass(frozen=True)
class DecodeFailure:
    """An image that could not be used, carried back from a worker as data."""

    path: str
    reason: str


# Keeps item streams apart from other SeedSequence([seed, a, b]) streams of the same run.
_ITEM_STREAM = 0x17E3


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of item ``index``'s random draws in ``epoch`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, index, _ITEM_STREAM]).generate_state(1)[0])


class ImageDataset(Dataset):
    """``(transform(image), label)`` per file; ``label`` is an int64 scalar tensor.

    ``draft`` is the smallest (w, h) the transform needs: JPEGs are decoded at a reduced scale that
    never goes below it (see ``open_rgb``). With ``seed``, the transform's random draws are a pure
    function of ``(seed, epoch, index)`` (see the module docstring and :meth:`set_epoch`);
    without, they come from whatever global torch RNG state the calling process has.
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
        seed: int | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft = draft
        self.defer_errors = defer_errors
        self.seed = seed
        # In shared memory, so worker processes (forked or spawned, persistent or not) read the
        # epoch the main process sets, not the one their copy of the dataset was made with.
        self._epoch = torch.zeros((), dtype=torch.int64)
        if seed is not None:
            self._epoch.share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items belong to (part of their seed); call before iterating."""
        self._epoch.fill_(int(epoch))

    def item_seed(self, index: int) -> int | None:
        """The seed of item ``index``'s random draws now; None: the global RNG is used."""
        if self.seed is None:
            return None
        return item_seed(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | DecodeFailure:
        path = self.paths[index]
        try:
            image = open_rgb(path, max_pixels=self.max_pixels, draft=self.draft)
            seed = self.item_seed(index)
            if seed is None:
                return self.transform(image), self.labels[index]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
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
