"""Feature extraction sharded over the ranks Lightning Fabric launches (ddp_spawn, torchrun, srun).

Each image is computed once in the whole job: the images are deduplicated by content digest and
sorted by it (so the shards do not depend on folder order and mix large and small files), and rank
``r`` of ``w`` takes the ``r``-th of ``w`` contiguous slices. Every rank extracts the images of its
slice that the feature cache lacks into the cache, then all wait at a barrier; from then on the
cache holds every image's features, and whoever trains the head reads them with a plain
:class:`~transferlab.extract.FeatureExtractor` call (all cache hits). Ranks exchange only counts
and failure reasons, never features: the cache folder is the hand-off, so it must be one that
every rank writes and reads (a shared filesystem across nodes), which is checked after the
barrier by reading back a few entries each rank wrote.

Launching is :func:`transferlab.engine.launch.make_fabric`'s (the same accelerator, devices,
strategy and node handling as training); under torchrun or srun every rank runs the calling
command and gets the same :class:`ShardReport`, under ``ddp_spawn`` the ranks are children of the
caller, which gets rank 0's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transferlab.config import FitConfig
from transferlab.engine.launch import make_fabric
from transferlab.errors import TransferlabError
from transferlab.extract import FeatureExtractor
from transferlab.progress import progress
from transferlab.system import available_cpus

__all__ = ["ShardReport", "extract_sharded", "shard_slice", "unique_images", "wants_ranks"]

# Images per FeatureExtractor call inside a rank: bounds the features a rank holds in memory
# (8 MB at 1280-d) however large its shard; a call costs one decode-pool start (fork, ~10 ms).
_CHUNK = 1536
# Entries per rank read back after the barrier to prove the cache is shared.
_PROBES = 4


@dataclass
class ShardReport:
    """What a sharded extraction did, summed over ranks; ``ranks`` has each rank's counts."""

    images: int  # unique images (by content digest)
    computed: int
    cache_hits: int
    failures: list[tuple[str, str]]  # (path, reason), from every rank
    seconds: float
    world_size: int
    ranks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.computed and self.seconds > 0 else 0.0


def unique_images(paths: Sequence[str], digests: Sequence[str]) -> tuple[list[str], list[str]]:
    """(paths, digests) with one path per digest (the first in sorted path order), by digest."""
    first: dict[str, str] = {}
    for path, digest in sorted(zip(paths, digests, strict=True)):
        first.setdefault(digest, path)
    order = sorted(first)
    return [first[d] for d in order], order


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items: sizes differ by at most one."""
    return slice(n * rank // world, n * (rank + 1) // world)


@dataclass(frozen=True)
class _Job:
    extractor: FeatureExtractor
    paths: list[str]
    digests: list[str]


def extract_sharded(
    extractor: FeatureExtractor,
    paths: Sequence[str],
    digests: Sequence[str],
    config: FitConfig,
    *,
    num_nodes: int | None = None,
    part: tuple[int, int] = (0, 1),
) -> ShardReport:
    """Fill ``extractor``'s cache with the features of ``paths`` on the ranks ``config``
    describes (``accelerator``, ``devices``, ``dist_strategy``; ``num_nodes``: default the SLURM
    job's, else 1), each image computed once. ``part=(i, k)`` keeps only the ``i``-th of ``k``
    slices of the images, for independent jobs such as the tasks of a SLURM array. Raises
    :class:`TransferlabError` when the ranks do not share the cache folder."""
    unique_paths, unique_digests = unique_images(paths, digests)
    if part != (0, 1):
        mine = shard_slice(len(unique_digests), *part)
        unique_paths, unique_digests = unique_paths[mine], unique_digests[mine]
    fabric = make_fabric(_spawn_by_default(config, num_nodes), num_nodes=num_nodes)
    job = _Job(extractor, unique_paths, unique_digests)
    # The job rides in a partial: Fabric's spawn launcher walks positional arguments.
    report: ShardReport = fabric.launch(functools.partial(_run_rank, job=job))
    problems = [r["problem"] for r in report.ranks if r.get("problem")]
    if problems:
        raise TransferlabError(problems[0])
    return report


def wants_ranks(config: FitConfig) -> bool:
    """Whether ``config`` asks for more than one process (devices, nodes, or a launcher's)."""
    devices = str(config.devices).strip()
    several = devices not in ("1", "auto") and not (devices.isdigit() and int(devices) < 2)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several or (config.num_nodes or 1) > 1 or launched


def _spawn_by_default(config: FitConfig, num_nodes: int | None) -> FitConfig:
    """``auto`` means ddp_spawn for several ranks that no launcher started: Fabric's own ``ddp``
    would re-run the whole command (data scan included) in each extra process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    several = config.devices not in (1, "1") or (num_nodes or 1) > 1
    launched = TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
    if config.dist_strategy != "auto" or not several or launched:
        return config
    return dataclasses.replace(config, dist_strategy="ddp_spawn")


def _run_rank(fabric: Any, job: _Job) -> ShardReport:
    rank, world = fabric.global_rank, fabric.world_size
    ex = job.extractor
    if world > 1:
        # Ranks on one node share its cores: split them, or every rank's engine and decode
        # workers would each claim all of them.
        nodes = int(getattr(fabric.strategy, "num_nodes", 1) or 1)
        per_rank = max(1, available_cpus() // max(1, world // nodes))
        ex.threads = ex.threads or per_rank
        ex.workers = per_rank if ex.workers is None else ex.workers
        torch.set_num_threads(ex.threads)
    mine = shard_slice(len(job.digests), rank, world)
    t0 = time.perf_counter()
    stats = _extract(ex, job.paths[mine], job.digests[mine], rank, world)
    stats["seconds"] = time.perf_counter() - t0
    ex.store.close()  # finish this rank's pack before the others read it
    fabric.barrier()
    everyone = _all_gather(stats, world)
    problem = _unshared_cache(ex, everyone, rank)
    for s in everyone:
        s["problem"] = problem
    if world > 1 and torch.distributed.is_initialized():
        # Stop gloo's threads before the rank exits: left to interpreter shutdown, a spawned
        # rank sometimes aborts there ("terminate called without an active exception").
        fabric.barrier()
        torch.distributed.destroy_process_group()
    return ShardReport(
        images=len(job.digests),
        computed=sum(s["computed"] for s in everyone),
        cache_hits=sum(s["cache_hits"] for s in everyone),
        failures=[tuple(f) for s in everyone for f in s["failures"]],
        seconds=max(s["seconds"] for s in everyone),
        world_size=world,
        ranks=everyone,
    )


def _extract(
    ex: FeatureExtractor, paths: list[str], digests: list[str], rank: int, world: int
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "rank": rank, "host": os.uname().nodename, "images": len(paths), "computed": 0,
        "cache_hits": 0, "failures": [], "written": [],
    }  # fmt: skip
    title = "features" if world == 1 else f"features (rank 0 of {world}: its shard)"
    # Only rank 0 draws progress: the others' lines would interleave with it.
    bar = progress(len(paths), title) if rank == 0 else contextlib.nullcontext(None)
    with bar as advance:
        for start in range(0, len(paths), _CHUNK):
            chunk = digests[start : start + _CHUNK]
            got = ex(paths[start : start + _CHUNK], chunk, on_progress=advance)
            stats["computed"] += got.stats["computed"]
            stats["cache_hits"] += got.stats["cache_hits"]
            stats["failures"] += [list(f) for f in got.failures]
            if len(stats["written"]) < _PROBES:
                good = [d for d, ok in zip(chunk, got.ok, strict=True) if ok]
                stats["written"] += good[: _PROBES - len(stats["written"])]
    return stats


def _all_gather(stats: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's stats, in rank order (Fabric has already set up the process group)."""
    if world == 1:
        return [stats]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, stats)
    return out


def _unshared_cache(ex: FeatureExtractor, everyone: list[dict[str, Any]], rank: int) -> str | None:
    """Why the features the ranks computed are not all readable by ``rank``, or None."""
    for s in everyone:
        # A rank that could not write (read-only folder, full disk) fails the same check.
        if len(ex.store.get_many(s["written"])) < len(s["written"]):
            return (
                f"the features rank {s['rank']} ({s['host']}) computed are not in "
                f"{ex.store.path} for rank {rank} ({os.uname().nodename}): the cache folder "
                "must be writable by every rank and on a filesystem every node shares; give "
                "--cache-dir (or TRANSFERLAB_CACHE) such a folder"
            )
    return None
