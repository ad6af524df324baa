"""``extract``: fill the feature cache for a dataset, sharded over processes and machines.

The ranks are Lightning Fabric's (``--devices`` processes per node, ``--num-nodes`` nodes, or
whatever torchrun / srun started); see :mod:`transferlab.engine.shards` and docs/cluster.md. A
``fit`` on the same data and backbone afterwards reads every feature from the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from transferlab.config import DEFAULT_BACKBONE
from transferlab.errors import TransferlabError
from transferlab.progress import out_console

if TYPE_CHECKING:
    from transferlab.engine.shards import ShardReport

_SHOWN_FAILURES = 10


def register(app: typer.Typer) -> None:
    """Add ``extract`` to the transferlab CLI app."""
    app.command("extract")(extract)


def extract(
    data: Path = typer.Argument(..., help="Images: split folders, class folders, flat or CSV."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="As fit's --backbone."),
    pretrained: bool = typer.Option(True, help="--no-pretrained: random init (as fit's)."),
    engine: str = typer.Option("auto", help="Frozen base runtime: auto|openvino|onnxruntime|torch"),
    devices: int = typer.Option(1, help="Processes per node (each takes a shard of the images)."),
    num_nodes: int = typer.Option(1, help="Nodes (torchrun --nnodes, or the SLURM job's)."),
    accelerator: str = typer.Option("cpu", help="Lightning accelerator of the ranks' group."),
    dist_strategy: str = typer.Option(
        "auto", help="auto (ddp_spawn on one machine, ddp under torchrun/srun) | ddp | ddp_spawn"
    ),
    cache_dir: Path | None = typer.Option(None, help="Feature cache; every rank must see it."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    workers: int | None = typer.Option(None, help="Decode threads per rank (default: cores)."),
    max_pixels: int = typer.Option(89_478_485, help="Refuse larger images (bomb guard)."),
    image_size: int | None = typer.Option(
        None, help="Input size as fit's --image-size (default: fit's, so fit reuses them)."
    ),
    part: str = typer.Option(
        "0/1", help="I/K: only the I-th (from 0) of K slices of the images, e.g. an array task's."
    ),
) -> None:
    """Compute and cache the backbone features of every image in DATA, each image once."""
    from transferlab.api import feature_extractor, seed_everything
    from transferlab.config import FitConfig
    from transferlab.data.prepared import prepare_data
    from transferlab.engine.shards import extract_sharded
    from transferlab.strategies import config_backbone
    from transferlab.system import is_rank_zero

    if num_nodes < 1 or devices < 1:
        raise TransferlabError("--devices and --num-nodes take a count of at least 1")
    index, count = _part(part)
    cfg = FitConfig(
        backbone=backbone, pretrained=pretrained, engine=engine, devices=devices,
        accelerator=accelerator, dist_strategy=dist_strategy, batch_size=batch_size,
        workers=workers, max_pixels=max_pixels, cache_dir=str(cache_dir) if cache_dir else None,
        image_size=image_size,
    ).validate()  # fmt: skip
    prepared = prepare_data(data, cfg)
    splits = prepared.splits.values()
    paths = [p for s in splits for p in s.paths]
    digests = [d for s in splits for d in s.digests]
    seed_everything(cfg.seed)  # a --no-pretrained backbone is the same one in every run and rank
    extractor = feature_extractor(config_backbone(cfg), cfg)
    report = extract_sharded(
        extractor, paths, digests, cfg, num_nodes=num_nodes, part=(index, count)
    )
    if is_rank_zero():  # rank 0 reports for all
        of = f" (part {index}/{count})" if count > 1 else ""
        _print_report(report, f"{len(paths)} images, {report.images} distinct{of}")
        out_console.print(f"features of {cfg.backbone} in {extractor.store.path}", highlight=False)


def _print_report(report: ShardReport, what: str) -> None:
    for path, reason in report.failures[:_SHOWN_FAILURES]:
        out_console.print(f"skipped {path}: {reason}", highlight=False)
    rate = f", {report.images_per_s:.0f} img/s" if report.computed else ""
    out_console.print(
        f"{what}: {report.computed} computed, {report.cache_hits} cached, "
        f"{len(report.failures)} failed, on {report.world_size} rank(s) in "
        f"{report.seconds:.1f} s{rate}",
        highlight=False,
    )


def _part(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise TransferlabError(
        f"--part {text!r}: give I/K with 0 <= I < K, e.g. --part 3/16 "
        "(in a SLURM array: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
    )
