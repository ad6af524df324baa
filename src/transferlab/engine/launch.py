"""``train``: check the arguments and a resumed checkpoint, launch the trainer under Fabric.

Built on Lightning **Fabric** (accelerator, devices, DDP, precision, process launching) with the
loop written here (:mod:`transferlab.engine.loop`), because transferlab owns the stage logic
(B#1, B#2 in docs/prior-art.md); with ``Trainer`` each stage would be one ``fit`` (and, under
``ddp_spawn``, one process spawn).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.augment import PRESETS
from transferlab.config import FitConfig
from transferlab.data.prepared import Split
from transferlab.engine.batchnorm import has_placeholder_bn, recalibrate_bn, recalibration_batches
from transferlab.engine.checkpoint import (
    BEST_CKPT,
    CHECKPOINT_DIR,
    LAST_CKPT,
    check_resume,
    load_checkpoint,
)
from transferlab.engine.loop import MONITORS, Job, RunOutput, run_job
from transferlab.engine.stages import Stage
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.preprocess import Preprocess
from transferlab.progress import info
from transferlab.system import tune_glibc_malloc


@dataclass
class TrainResult:
    net: ClassifierNet  # best weights loaded, eval mode, CPU
    history: list[dict]
    epochs: int
    best_epoch: int
    seconds: float
    trainable_params: int
    stop_reason: str = "completed"  # completed | early_stop | max_time
    images_per_s: float = 0.0  # training throughput (images/s summed over ranks)
    recalibrated_bn: bool = False


def train(
    net: ClassifierNet,
    train: Split,
    val: Split | None,
    *,
    preprocess: Preprocess,
    config: FitConfig,
    out: Path,
    stages: list[Stage],
    augment: str,
    monitor: str = "val_loss",
    num_classes: int | None = None,
    min_epochs: int = 0,
) -> TrainResult:
    """Train ``net`` through ``stages`` on image files; returns it with the best weights loaded.

    Writes ``out/history.csv`` and ``out/checkpoints/{last,best}.ckpt`` (in a temporary folder,
    deleted afterwards, when ``out`` is ``os.devnull``). ``config.resume`` continues from
    ``out/checkpoints/last.ckpt`` with the stage, frozen set, parameter groups, optimizer,
    schedule position, best weights and early-stopping counter it holds. ``monitor`` (val_loss or
    val_acc) picks the best epoch and drives early stopping (``config.patience``), which never
    stops the run before ``min_epochs`` epochs (Keras' ``start_from_epoch``). A checkpoint
    written with other training options (:func:`resume_config`) or other train/val images is
    refused, naming the differences. ``num_classes`` (default: the head's output width) sizes
    the ``--class-weight auto`` weights.
    """
    _check_args(stages, config, augment, monitor)
    if num_classes is None:
        num_classes = _head_outputs(net)
    run_dir, scratch_dir = _run_dir(out, config)
    job = Job(
        train,
        val,
        preprocess,
        config,
        run_dir,
        stages,
        augment,
        monitor,
        num_classes,
        int(min_epochs),
        os.getpid(),
    )
    if config.resume:  # fail here, not in a rank
        check_resume(run_dir / CHECKPOINT_DIR / LAST_CKPT, net, job)
    recalibrated = not config.resume and _recalibrate_placeholder_bn(net, job)
    tune_glibc_malloc()  # eager PyTorch here is ~2x faster with it (perf-notes.md)
    grad_flags = {n: p.requires_grad for n, p in net.named_parameters()}
    t0 = time.perf_counter()
    try:
        output, best_state = _launch(net, job)
        seconds = time.perf_counter() - t0
    finally:
        if scratch_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    _hand_back(net, best_state, grad_flags)
    return _result(net, output, seconds, recalibrated)


def _check_args(stages: list[Stage], config: FitConfig, augment: str, monitor: str) -> None:
    if not stages:
        raise TransferlabError("train() needs at least one stage")
    for s in stages:
        s.check()
    if augment not in PRESETS:
        raise TransferlabError(f"--augment {augment!r} is unknown; choose one of {PRESETS}")
    if monitor not in MONITORS:
        raise TransferlabError(f"monitor {monitor!r} is unknown; choose one of {list(MONITORS)}")
    config.validate()


def _run_dir(out: Path, config: FitConfig) -> tuple[Path, bool]:
    """(the folder to write to, whether it is a temporary one for ``out`` = ``os.devnull``)."""
    scratch_dir = str(out) == os.devnull
    if scratch_dir and config.resume:
        raise TransferlabError("--resume needs the --out folder of the interrupted run")
    run_dir = Path(tempfile.mkdtemp(prefix="transferlab-train-")) if scratch_dir else Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, scratch_dir


def _head_outputs(net: ClassifierNet) -> int:
    """The number of logits: the output width of the head's last Linear layer."""
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TransferlabError("train() cannot tell the number of classes: pass num_classes")
    return int(linears[-1].out_features)


def _recalibrate_placeholder_bn(net: ClassifierNet, job: Job) -> bool:
    """Measure real BN statistics before a stage trains BN on placeholders; True if it did."""
    if not any(s.bn == "train" for s in job.stages) or not has_placeholder_bn(net.body):
        return False
    seen = recalibrate_bn(net.body, recalibration_batches(job.train, job.preprocess, job.config))
    info(
        f"BN statistics are placeholders (folded constants): re-estimated them on {seen} "
        "training images before training with --bn train (eval output unchanged)"
    )
    return True


def _launch(net: ClassifierNet, job: Job) -> tuple[RunOutput, dict[str, torch.Tensor]]:
    """Run the trainer on every rank; (rank 0's output, the best weights)."""
    # The job rides in a partial: Fabric's spawn launcher walks the positional arguments and
    # refuses frozen dataclasses (Preprocess) inside them.
    output: RunOutput = make_fabric(job.config).launch(functools.partial(run_job, job=job), net)
    best_state = output.best_state
    if best_state is None:
        best_state = load_checkpoint(job.run_dir / CHECKPOINT_DIR / BEST_CKPT)["model"]
    return output, best_state


def _hand_back(
    net: ClassifierNet, best_state: dict[str, torch.Tensor], grad_flags: dict[str, bool]
) -> None:
    """The caller's network as it came in (CPU, its ``requires_grad`` flags), best weights, eval."""
    net.to("cpu", memory_format=torch.contiguous_format)
    net.load_state_dict(best_state)
    for n, p in net.named_parameters():
        p.requires_grad_(grad_flags[n])
    net.eval()


def _result(
    net: ClassifierNet, output: RunOutput, seconds: float, recalibrated: bool
) -> TrainResult:
    st = output.state
    return TrainResult(
        net=net,
        history=st.history,
        epochs=st.epoch,
        best_epoch=st.best_epoch,
        seconds=seconds,
        trainable_params=st.trainable_params,
        stop_reason=st.stop_reason or "completed",
        images_per_s=st.images / st.train_seconds if st.train_seconds > 0 else 0.0,
        recalibrated_bn=recalibrated,
    )


def _num_nodes() -> int:
    """Nodes of the SLURM job this process was started in by ``srun`` (1 elsewhere)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return 1
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def make_fabric(config: FitConfig, *, num_nodes: int | None = None) -> Any:
    """Fabric for ``config``'s accelerator, devices, strategy and precision, on ``num_nodes``
    nodes (default: the SLURM job's, else 1); training and sharded extraction both start here."""
    from lightning.fabric import Fabric

    nodes = num_nodes or config.num_nodes or _num_nodes()
    try:
        return Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.dist_strategy,
            precision=config.precision,
            num_nodes=nodes,
        )
    except (ValueError, RuntimeError, TypeError) as e:
        raise TransferlabError(
            f"cannot set up --accelerator {config.accelerator} --devices {config.devices} "
            f"--dist-strategy {config.dist_strategy} --precision {config.precision} "
            f"on {nodes} node(s): {e}"
        ) from None


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a multi-process launch (``srun``, ``torchrun``,
    Fabric's ``ddp`` re-launch); True in a plain single process.

    Under those launchers every rank runs the whole command; only rank 0 should write the run
    folder (``ddp_spawn`` needs no care: the ranks are children of the one command).
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
