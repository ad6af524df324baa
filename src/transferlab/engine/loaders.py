"""The engine's data: seeded datasets, loaders sharded over ranks, batches on the device.

Randomness is re-derived at the start of every epoch from ``(seed, epoch, rank)`` (Python, NumPy,
torch, the DataLoader generator that seeds workers, and the sampler's shuffle), so a run resumed
from an epoch boundary draws exactly what the uninterrupted run would have drawn, on every rank.
Augmentation draws are per item: a pure function of ``(seed, epoch, item index)``
(``ImageDataset(seed=...)`` + ``set_epoch``), so they do not depend on the number of DataLoader
workers (which :func:`default_workers` picks from the machine's cores), on the batch or on the
rank. With ``deterministic`` the same command and seed give the same numbers, on any core count.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from transferlab.augment import build_transform, draft_size
from transferlab.config import FitConfig
from transferlab.data.dataset import ImageDataset, collate, raise_if_failed
from transferlab.data.prepared import Split
from transferlab.preprocess import Preprocess
from transferlab.system import available_cpus


def default_workers(config: FitConfig) -> int:
    """DataLoader worker processes per rank: ``config.workers``, else from the cores."""
    if config.workers is not None:
        return max(0, int(config.workers))
    per_rank = max(1, available_cpus() // max(1, _int_devices(config.devices)))
    if uses_cuda(config.accelerator):
        return max(1, min(8, per_rank - 1))  # the GPU outruns JPEG decoding: feed it
    # On CPU a JPEG decode costs a few % of a core next to a training step: one or two workers
    # overlap it without taking cores from the model. The choice only changes the speed: the
    # augmentation of every item is seeded by (seed, epoch, index), not by a worker's stream.
    return 1 if per_rank <= 4 else 2


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning puts the run on a CUDA GPU: asked for, or "auto" with one present."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _int_devices(devices: int | str) -> int:
    try:
        return int(devices)
    except (TypeError, ValueError):
        return 1  # "auto", "-1", lists: one rank's worth is a safe guess


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of everything one rank draws in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_worker(worker_id: int) -> None:
    # torch is already seeded per worker from the loader's generator; extend it to random/numpy
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


class RankData:
    """One rank's loaders: its shard of the training set (shuffled per epoch) and of val."""

    def __init__(
        self,
        train: Split,
        val: Split | None,
        preprocess: Preprocess,
        config: FitConfig,
        augment: str,
        fabric: Any,
    ) -> None:
        self.preprocess, self.config, self.fabric = preprocess, config, fabric
        self.generator = torch.Generator()
        self.train_set = self._dataset(train, augment, train=True)
        self.sampler = DistributedSampler(
            self.train_set,
            num_replicas=fabric.world_size,
            rank=fabric.global_rank,
            shuffle=True,
            seed=config.seed,
        )
        # a batch of one breaks train-mode BatchNorm: drop it when the last batch would be one
        drop = len(self.sampler) % config.batch_size == 1 and len(self.sampler) > 1
        self.train_loader = self._loader(
            self.train_set, sampler=self.sampler, generator=self.generator, drop_last=drop
        )
        self.val_loader = self._val_loader(val)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Seed the shuffle and the workers, and tell the items, before the epoch's first batch."""
        self.generator.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)  # before the loader's workers fetch items

    def _dataset(self, split: Split, preset: str, train: bool) -> ImageDataset:
        pre = self.preprocess
        return ImageDataset(
            split.paths,
            split.labels,
            build_transform(preset, pre, train=train),
            self.config.max_pixels,
            draft=draft_size(pre),
            defer_errors=default_workers(self.config) > 0,
            seed=self.config.seed if train else None,  # item draws: (seed, epoch, index)
        )

    def _loader(self, ds: Any, **kw: Any) -> DataLoader:
        workers = default_workers(self.config)
        return DataLoader(
            ds,
            batch_size=self.config.batch_size,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=_seed_worker if workers else None,
            pin_memory=self.fabric.device.type == "cuda",
            **kw,
        )

    def _val_loader(self, val: Split | None) -> DataLoader | None:
        if val is None or len(val) == 0:
            return None
        # Each rank takes every world-th image, without DistributedSampler's padding, so the
        # summed metrics count every validation image exactly once.
        rank, world = self.fabric.global_rank, self.fabric.world_size
        shard = Subset(self._dataset(val, "none", train=False), range(rank, len(val), world))
        return self._loader(shard, shuffle=False)


def device_batches(
    batches: Iterable[Any], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` on ``device`` (images channels-last), raising on a batch with a failed decode."""
    for batch in batches:
        raise_if_failed(batch)
        x, y = batch
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        yield x, y.to(device, non_blocking=True)
