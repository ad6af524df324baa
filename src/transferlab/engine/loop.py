"""The trainer: one process's loop over stages and epochs (one rank under DDP).

A changed trainable set needs a fresh optimizer and a fresh DDP wrapper (DDP registers its
gradient hooks for the parameters that require grad at wrap time): one ``fabric.setup`` per stage
inside one launched process group. Each epoch is :func:`transferlab.training.run_batches` over
the stage's :class:`~transferlab.training.Stepper` at the configured schedule, then validation,
best-epoch tracking (early stopping), checkpoints and a history row. A first stage with a
``baseline`` makes the starting weights epoch 0's candidate: an epoch replaces them only by
beating them on the monitor without a lower val accuracy, so a run never ends worse on val than it
started (finetune: never below its phase-1 head).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from transferlab.engine.checkpoint import (
    CHECKPOINT_DIR,
    CKPT_FORMAT,
    CKPT_VERSION,
    HISTORY_CSV,
    LAST_CKPT,
    check_weights,
    cpu_state,
    load_checkpoint,
    run_identity,
    write_checkpoints,
)
from transferlab.engine.job import Job
from transferlab.engine.loaders import RankData, device_batches, epoch_seed
from transferlab.engine.optim import build_optimizer
from transferlab.engine.stages import (
    Stage,
    StagePlan,
    apply_plan,
    check_gradients,
    grad_boundary,
    plan_stage,
    set_train_mode,
)
from transferlab.errors import TransferlabError
from transferlab.model import ClassifierNet
from transferlab.progress import info, progress
from transferlab.training import (
    Best,
    EpochStats,
    Stepper,
    cross_entropy,
    history_row,
    lr_factor,
    run_batches,
    write_history,
)

MONITORS = {"val_loss": "min", "val_acc": "max"}


@dataclass
class _State(Best):
    """Where a run is; JSON-able, saved in every checkpoint (with Best's best_epoch, best_score
    and wait: early stopping resumes where it was)."""

    stage_index: int = 0
    stage_epoch: int = 0  # epochs completed in the current stage
    stage_step: int = 0  # optimizer steps taken in the current stage
    epoch: int = 0  # epochs completed overall
    global_step: int = 0
    elapsed: float = 0.0  # training seconds so far, across resumes (the max_time budget)
    stop_reason: str | None = None
    trainable_params: int = 0
    floor_acc: float | None = None  # the starting weights' val_acc (first stage's baseline)
    images: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


@dataclass
class RunOutput:
    best_state: dict[str, torch.Tensor] | None  # None from a spawned process: see best.ckpt
    state: _State


def run_job(fabric: Any, net: ClassifierNet, job: Job) -> RunOutput:
    """The launched function (once per rank)."""
    saved = torch.are_deterministic_algorithms_enabled()
    if job.config.deterministic:
        # cuBLAS is only reproducible with a fixed workspace (read when CUDA first initialises)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(job.config.deterministic, warn_only=True)
    try:
        return Trainer(fabric, net, job).run()
    finally:
        torch.use_deterministic_algorithms(saved)


def _seed_all(seed: int) -> None:
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(seed, verbose=False)


class Trainer:
    """One process's training loop (one rank under DDP)."""

    def __init__(self, fabric: Any, net: ClassifierNet, job: Job) -> None:
        self.fabric = fabric
        self.net = net
        self.job = job
        self.cfg = job.config
        self.rank = fabric.global_rank
        self.world = fabric.world_size
        self.ckpt_dir = job.run_dir / CHECKPOINT_DIR
        self.monitor_mode = MONITORS[job.monitor]
        self.best_state: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()
        self.state = _State()
        self.resume: dict[str, Any] | None = None
        self.identity = run_identity(self.cfg, job.train, job.val, job.setup())
        self.criterion = cross_entropy(job.train.labels, job.num_classes, self.cfg)
        self.data = RankData(job.train, job.val, job.preprocess, self.cfg, job.augment, fabric)

    # -- run ----------------------------------------------------------------------------------

    def run(self) -> RunOutput:
        if self.cfg.resume:
            self._restore()
        else:
            self._start_from_baseline()
        first_epoch = self.state.epoch
        self.net.to(self.fabric.device, memory_format=torch.channels_last)
        self.criterion.to(self.fabric.device)
        while self.state.stop_reason is None and self.state.stage_index < len(self.job.stages):
            self._run_stage()
        if self.state.stop_reason is None:
            self.state.stop_reason = "completed"
        if self.cfg.resume and self.state.epoch == first_epoch and self.fabric.is_global_zero:
            info(self._nothing_left())
        if not self.best_state:
            self.best_state = cpu_state(self.net)
        if self.state.floor_acc is not None and self.state.best_epoch == 0 and self.rank == 0:
            info("no epoch beat the starting weights on val: they are the result (epoch 0)")
        self._save_checkpoints(improved=False)
        self.fabric.barrier()
        # Tensors returned from a spawned process travel as shared-memory handles that die with
        # it (before the caller reads them): such a caller reloads best.ckpt instead.
        in_caller = os.getpid() == self.job.caller_pid
        return RunOutput(best_state=self.best_state if in_caller else None, state=self.state)

    def _start_from_baseline(self) -> None:
        """The first stage's baseline makes the starting weights epoch 0's candidate for best."""
        baseline = self.job.stages[0].baseline
        if baseline is None or self.data.val_loader is None:
            return
        self.state.update(baseline[self.job.monitor], 0, self.monitor_mode)
        self.state.floor_acc = baseline["val_acc"]
        self.best_state = cpu_state(self.net)

    def _nothing_left(self) -> str:
        """Why a resumed run trained no epoch, and what would make it train."""
        done = f"resumed after epoch {self.state.epoch}, nothing left to train"
        if self.state.stop_reason == "max_time":
            return (
                f"{done}: the time budget is spent ({self.state.elapsed:.0f} s of --max-time "
                f"{self.cfg.max_time:g} s); resume with a larger --max-time to continue"
            )
        if self.state.stop_reason == "early_stop":
            return f"{done}: early stopping had ended the run (raise --patience to train on)"
        return f"{done}: every epoch of the plan was done (the run is complete)"

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.ckpt_dir / LAST_CKPT)
        check_weights(self.net, ckpt["model"], self.ckpt_dir / LAST_CKPT)
        self.net.load_state_dict(ckpt["model"])
        self.state = _State(**ckpt["state"])
        best = ckpt.get("best_model")
        self.best_state = dict(best) if best else cpu_state(self.net)
        if self.state.stage_epoch >= self.job.stages[self.state.stage_index].epochs:
            self._next_stage()
        else:
            self.resume = ckpt  # the current stage continues: plan + optimizer from the file
        if self.state.stop_reason == "max_time":
            self.state.stop_reason = None  # the budget (restored elapsed time) decides again
        self.started = time.perf_counter() - self.state.elapsed

    def _next_stage(self) -> None:
        self.state.stage_index += 1
        self.state.stage_epoch = 0
        self.state.stage_step = 0

    def _run_stage(self) -> None:
        stage = self.job.stages[self.state.stage_index]
        if self.resume is not None:
            plan = StagePlan.from_dict(self.resume["plan"])
        else:
            plan = plan_stage(self.net, stage, self.cfg)
        count = apply_plan(self.net, plan)
        self.state.trainable_params = max(self.state.trainable_params, count)
        model, optimizer = self.fabric.setup(self.net, build_optimizer(self.net, plan, self.cfg))
        if self.resume is not None:
            try:
                optimizer.load_state_dict(self.resume["optimizer"])
            except (ValueError, KeyError) as e:
                raise TransferlabError(
                    f"{self.ckpt_dir / LAST_CKPT}: optimizer state does not fit this stage ({e})"
                ) from None
            self.resume = None
        with grad_boundary(self.net, plan):
            while self.state.stage_epoch < stage.epochs and self.state.stop_reason is None:
                self._epoch(model, optimizer, plan, stage)
        if self.state.stop_reason is None:
            self._next_stage()
        del model, optimizer  # drop this stage's DDP wrapper (and its gradient hooks)

    def _epoch(self, model: Any, optimizer: Any, plan: StagePlan, stage: Stage) -> None:
        if self._out_of_time():
            self.state.stop_reason = "max_time"
            return
        t0 = time.perf_counter()
        s = epoch_seed(self.cfg.seed, self.state.epoch, self.rank)
        _seed_all(s)
        self.data.set_epoch(self.state.epoch, s)
        train_loss, train_acc, n_images, lr = self._train_epoch(model, optimizer, plan, stage)
        t_train = time.perf_counter() - t0
        val = self._validate(plan)
        self.state.stage_epoch += 1
        self.state.epoch += 1
        self.state.images += n_images
        self.state.train_seconds += t_train
        row = history_row(
            self.state.epoch,
            (train_loss, train_acc),
            val,
            lr,
            stage.name,
            seconds=time.perf_counter() - t0,
            img_per_s=n_images / t_train if t_train > 0 else 0.0,
        )
        self.state.history.append(row)
        improved = self._track_best(row)
        self.state.elapsed = time.perf_counter() - self.started
        self._save_checkpoints(improved, plan, optimizer)
        self._log(row, stage)

    def _train_epoch(
        self, model: Any, optimizer: Any, plan: StagePlan, stage: Stage
    ) -> tuple[float, float, int, float]:
        steps_per_epoch = len(self.data.train_loader)
        total = stage.epochs * steps_per_epoch
        warmup = round(self.cfg.warmup_epochs * steps_per_epoch)
        set_train_mode(self.net, plan)
        first = self.state.stage_step == 0
        step = Stepper(
            model,
            optimizer,
            self.criterion,
            autocast=self.fabric.autocast,
            backward=self.fabric.backward,
            check=(lambda: check_gradients(self.net, plan)) if first else None,
        )
        stats = EpochStats()
        desc = f"epoch {self.state.epoch + 1} [{stage.name}]"
        with progress(steps_per_epoch if self.rank == 0 else 0, desc) as advance:

            def after(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> bool:
                self.state.stage_step += 1
                self.state.global_step += 1
                stats.add(loss, logits, y)
                advance(1)
                if self._out_of_time():
                    self.state.stop_reason = "max_time"
                    return True
                return False

            batches = device_batches(self.data.train_loader, self.fabric.device)
            lr_at = functools.partial(lr_factor, self.cfg.schedule, total=total, warmup=warmup)
            run_batches(step, batches, lr_at, after, first=self.state.stage_step)
        totals = self._sum([stats.loss_sum, float(stats.correct), float(stats.seen)])
        n = max(totals[2], 1.0)
        lr = optimizer.param_groups[0]["lr"] if stats.seen else 0.0
        return totals[0] / n, totals[1] / n, int(totals[2]), lr

    @torch.inference_mode()
    def _validate(self, plan: StagePlan) -> tuple[float | None, float | None]:
        if self.data.val_loader is None:
            return None, None
        set_train_mode(self.net, plan, training=False)
        loss_sum = correct = seen = 0.0
        for x, y in device_batches(self.data.val_loader, self.fabric.device):
            with self.fabric.autocast():
                logits = self.net(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        loss_sum, correct, seen = self._sum([loss_sum, correct, seen])
        return loss_sum / max(seen, 1.0), correct / max(seen, 1.0)

    def _sum(self, values: list[float]) -> list[float]:
        """Sum over ranks (float64 on CPU: exact counts, gloo-friendly)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            t = self.fabric.all_reduce(t.to(self.fabric.device), reduce_op="sum").cpu()
        return [float(v) for v in t]

    def _out_of_time(self) -> bool:
        if self.cfg.max_time is None:
            return False
        over = torch.tensor([time.perf_counter() - self.started >= self.cfg.max_time])
        if self.world > 1:  # every rank must stop at the same step, or DDP deadlocks
            over = self.fabric.broadcast(over, src=0)
        return bool(over.item())

    # -- best / early stopping / files ---------------------------------------------------------

    def _track_best(self, row: dict) -> bool:
        score = row.get(self.job.monitor)
        if score is None:  # no validation: the latest weights are the result
            self.state.best_epoch = row["epoch"]
            self.best_state = {}
            return True
        floor = self.state.floor_acc
        if floor is not None and row["val_acc"] < floor:
            self.state.wait += 1  # worse than the starting weights on val accuracy: never best
        elif self.state.update(score, row["epoch"], self.monitor_mode):
            self.best_state = cpu_state(self.net)
            return True
        grace = self.state.epoch < self.job.min_epochs  # e.g. a from-scratch net still at chance
        if self.state.exhausted(self.cfg.patience) and not grace:
            self.state.stop_reason = "early_stop"
        return False

    def _save_checkpoints(
        self, improved: bool, plan: StagePlan | None = None, optimizer: Any = None
    ) -> None:
        if self.rank != 0:
            return
        common = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "stages": [asdict(s) for s in self.job.stages],
            "monitor": self.job.monitor,
            "state": asdict(self.state),
            **self.identity,
        }
        model = cpu_state(self.net)
        write_checkpoints(self.ckpt_dir, common, improved, self.best_state, model, plan, optimizer)
        if plan is not None:
            write_history(self.job.run_dir / HISTORY_CSV, self.state.history)

    def _log(self, row: dict, stage: Stage) -> None:
        if self.rank != 0:
            return
        total = sum(s.epochs for s in self.job.stages)
        val = (
            f" | val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
            if row["val_loss"] is not None
            else ""
        )
        info(
            f"epoch {row['epoch']}/{total} {escape(f'[{stage.name}]')} "
            f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f}{val} | "
            f"lr {row['lr']:.2e} | "
            f"{row['img_per_s']:.1f} img/s | {row['seconds']:.1f} s"
        )
