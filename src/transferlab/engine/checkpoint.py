"""Training checkpoints: written atomically, checked fully on load, bound to the run they belong to.

Checkpoints (``out/checkpoints/last.ckpt`` each epoch, ``best.ckpt`` on improvement) are plain
dicts of tensors and JSON-able values written atomically (temp file + ``os.replace``), read back
with ``torch.load(weights_only=True)`` and checked (format, keys, shapes, a sha256 of the weights)
before anything is loaded: a truncated or corrupt file is a :class:`TransferlabError` naming it.
``last.ckpt`` alone is enough to resume: it also carries the best weights so far.

A checkpoint also records the training-relevant configuration (:func:`resume_config`: every
``FitConfig`` option except where and how fast the run executes) and digests of the training and
validation splits (paths, labels, file digests); ``--resume`` with other options or other data
is refused, naming what differs, before anything is loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.config import FitConfig
from transferlab.data.prepared import Split
from transferlab.engine.job import Job
from transferlab.engine.stages import StagePlan
from transferlab.errors import TransferlabError
from transferlab.storage import tensors_digest

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
HISTORY_CSV = "history.csv"
CKPT_FORMAT = "transferlab-train-checkpoint"
CKPT_VERSION = 2  # 2: + the run's configuration and data digests (resume refuses a change)
# FitConfig options that may change on --resume: where and how fast the run executes, the time
# budget, and the resume flag itself. Every other option is part of what the run trains.
RESUMABLE_OPTIONS = (
    "resume", "max_time", "accelerator", "devices", "dist_strategy", "precision", "workers",
    "cache_dir", "engine", "track", "overwrite", "num_nodes", "time_budget",
)  # fmt: skip
_REQUIRED = (
    "format", "version", "model", "digest", "state", "stages", "plan", "optimizer", "config",
    "setup", "data",
)  # fmt: skip
_UNSET = object()


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state_dict."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoints(
    ckpt_dir: Path,
    common: dict[str, Any],
    improved: bool,
    best_state: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    plan: StagePlan | None = None,
    optimizer: Any = None,
) -> None:
    """``best.ckpt`` when ``improved``, then ``last.ckpt`` (``model`` + the plan and optimizer
    to continue from); at the end of a run (no ``plan``) ``best.ckpt`` holds the result."""
    digest = tensors_digest(model)
    if improved:
        # best first: a kill between the two writes leaves last.ckpt (which carries the best
        # weights itself) consistent
        best = {**common, "model": model, "digest": digest, "plan": {}, "optimizer": {}}
        _atomic_torch_save(best, ckpt_dir / BEST_CKPT)
    if plan is None:  # end of run: last.ckpt is already current, best.ckpt holds the result
        final_state = best_state or model
        final = {**common, "model": final_state, "digest": tensors_digest(final_state)}
        _atomic_torch_save({**final, "plan": {}, "optimizer": {}}, ckpt_dir / BEST_CKPT)
        return
    last = {
        **common,
        "model": model,
        "digest": digest,
        "plan": plan.to_dict(),
        "optimizer": optimizer.state_dict(),
        "best_model": None if improved or not best_state else best_state,
    }
    _atomic_torch_save(last, ckpt_dir / LAST_CKPT)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and fully check a training checkpoint; raises TransferlabError naming a bad file."""
    path = Path(path)
    if not path.is_file():
        raise TransferlabError(
            f"{path}: no checkpoint to resume from; run without --resume to start training"
        )
    try:
        with open(path, "rb") as f:
            ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/unpickler errors all mean the same to a user
        raise TransferlabError(
            f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0][:200]}); "
            "delete it and start again without --resume"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TransferlabError(f"{path}: not a transferlab training checkpoint")
    if ckpt.get("version") != CKPT_VERSION or any(k not in ckpt for k in _REQUIRED):
        raise TransferlabError(
            f"{path}: checkpoint version {ckpt.get('version')} or layout is not supported by this "
            f"transferlab (expects version {CKPT_VERSION})"
        )
    if tensors_digest(ckpt["model"]) != ckpt["digest"]:
        raise TransferlabError(
            f"{path}: checkpoint weights do not match their checksum (corrupt file); "
            "delete it and start again without --resume"
        )
    return ckpt


def check_weights(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a state that does not fit ``net`` before copying anything (no half-loading)."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        detail = (missing or extra or shapes)[:3]
        raise TransferlabError(
            f"{path}: checkpoint does not fit this model (missing {len(missing)}, unexpected "
            f"{len(extra)}, mismatched shapes {len(shapes)}, e.g. {detail}); it was written by a "
            "different backbone/head: resume with the same command, or start without --resume"
        )


def resume_config(config: FitConfig) -> dict[str, Any]:
    """The options a checkpoint is bound to: ``config.to_dict()`` minus RESUMABLE_OPTIONS."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_OPTIONS}


def _split_digest(split: Split | None) -> dict[str, Any]:
    """A split's identity: its size and a sha256 over (path, label, file digest), in order."""
    if split is None:
        return {"images": 0, "sha256": None}
    h = hashlib.sha256()
    for path, label, digest in zip(split.paths, split.labels, split.digests, strict=True):
        h.update(f"{path}\0{int(label)}\0{digest}\n".encode())
    return {"images": len(split), "sha256": h.hexdigest()}


def run_identity(
    config: FitConfig, train: Split, val: Split | None, setup: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint records so that ``--resume`` can refuse another run's options or data.

    ``setup``: what the strategy decided beyond the config and the stages (augment preset,
    monitor, min_epochs)."""
    return {
        "config": resume_config(config),
        "setup": setup,
        "data": {"train": _split_digest(train), "val": _split_digest(val)},
    }


def check_resume(path: Path, net: nn.Module, job: Job) -> None:
    """Refuse to resume from ``path`` unless it is this job's: options, data, stages, weights."""
    ckpt = load_checkpoint(path)
    _check_same_run(ckpt, path, run_identity(job.config, job.train, job.val, job.setup()))
    if ckpt["stages"] != [asdict(s) for s in job.stages]:
        raise TransferlabError(
            f"{path}: written for other stages ({[s['name'] for s in ckpt['stages']]}); resume "
            "with the same command and options"
        )
    check_weights(net, ckpt["model"], path)


def _show(value: Any, other: Any) -> str:
    if value is _UNSET or value is None:
        return "unset"
    return repr(value) if str(value) == str(other) else str(value)


def _check_same_run(ckpt: dict[str, Any], path: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` with other training options or other data, naming each."""
    then, now = ckpt["config"], identity["config"]
    diffs = []
    for key in [*now, *(k for k in then if k not in now)]:
        old, new = then.get(key, _UNSET), now.get(key, _UNSET)
        if old != new:
            option = "--" + key.replace("_", "-")
            diffs.append(f"{option} was {_show(old, new)}, now {_show(new, old)}")
    for key, new in identity["setup"].items():
        old = ckpt["setup"].get(key, _UNSET)
        if old != new:
            diffs.append(f"the strategy's {key} was {_show(old, new)}, now {_show(new, old)}")
    for name, what in (("train", "training"), ("val", "validation")):
        old, new = ckpt["data"].get(name) or {}, identity["data"][name]
        if old != new:
            diffs.append(
                f"the {what} images differ ({old.get('images', '?')} then, {new['images']} now; "
                "file paths, labels or contents changed)"
            )
    if diffs:
        raise TransferlabError(
            f"{path} was written by another run: {'; '.join(diffs)}: resume with the same "
            "options, or start a new --out"
        )
