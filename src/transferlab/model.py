"""The trained model: a body (pooled features) + a head (logits), and its run-folder format.

A saved model is a folder of plain files, loadable without executing code:

    model.json          classes, preprocessing, body recipe, head spec, strategy, seed, versions
    body.safetensors    the body's weights (always copied, so a model never depends on the
                        folder or hub it was trained from; ~9 MB for MobileNetV2)
    head.safetensors    the head's weights

The body's *identity* (spec + weights hash + preprocessing; see ``Backbone.identity``) is
recorded: an untouched pretrained body keeps the identity of the weights it came from, so
features cached at training time are reused by ``evaluate``/``predict`` after loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
BODY_FILE = "body.safetensors"
HEAD_FILE = "head.safetensors"


class ClassifierNet(nn.Module):
    """Normalized float images (n, 3, H, W) -> logits (n, C)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BN running statistics, no dropout), then each module's own flag.

    Restoring per module (not ``model.train(was_training)``) keeps deliberate mixes intact, e.g.
    a training model whose frozen BatchNorms stay in eval mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def build_body(recipe: dict[str, Any]) -> nn.Module:
    """An untrained body of the right shape, from the JSON recipe stored with the model."""
    kind = recipe.get("kind")
    if kind == "timm":
        import timm

        return timm.create_model(
            recipe["architecture"], pretrained=False, num_classes=0, **recipe.get("model_args", {})
        )
    if kind == "scratch":
        from transferlab.scratch import build_scratch_body

        return build_scratch_body(recipe)
    raise TransferlabError(f"unknown body kind {kind!r} in {MODEL_FILE}")


def timm_body_recipe(spec: str, model: nn.Module) -> dict[str, Any]:
    """Architecture + constructor args needed to rebuild a timm body without its source folder."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    model_args: dict[str, Any] = {}
    # timm applies a local-dir or hf-hub config.json's model_args when it builds the model; the
    # recipe must repeat them or the body rebuilt at load time is another network.
    cfg_path: Path | None = None
    if spec.startswith("local-dir:"):
        cfg_path = Path(spec[len("local-dir:") :]) / "config.json"
    elif spec.startswith("hf-hub:"):
        from transferlab.backbones import cached_hub_file

        cfg_path = cached_hub_file(spec[len("hf-hub:") :].split("@")[0], ["config.json"])
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        arch = cfg.get("architecture", arch)
        model_args = dict(cfg.get("model_args") or {})
    if arch is None:
        arch = spec.split(":", 1)[-1].split("/")[-1].split(".")[0]
    return {"kind": "timm", "architecture": arch, "model_args": model_args}


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and raw bytes; any dtype, bf16 too)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """A content hash of a module's weights, for cache identities and checkpoints."""
    return tensors_digest(module.state_dict())


def library_versions() -> dict[str, str]:
    import numpy
    import timm

    import transferlab

    return {
        "transferlab": transferlab.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class SavedModel:
    """Everything ``model.json`` records, plus the rebuilt network."""

    net: ClassifierNet
    classes: list[str]
    preprocess: Preprocess
    body: dict[str, Any]  # spec, weights_hash, recipe, trained (bool)
    head: dict[str, Any]  # head spec (see heads.build_head)
    strategy: str
    config: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    versions: dict[str, str] = field(default_factory=library_versions)

    def save(self, out: str | os.PathLike) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(self.net.body.state_dict(), out / BODY_FILE)
        _atomic_save_tensors(self.net.head.state_dict(), out / HEAD_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "body": self.body,
            "head": self.head,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "config": self.config,
            "versions": self.versions,
        }
        atomic_write_text(out / MODEL_FILE, json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavedModel:
        from transferlab.heads import build_head

        path = Path(path)
        meta_path = path / MODEL_FILE
        if not meta_path.is_file():
            raise TransferlabError(
                f"{path}: not a transferlab model folder (no {MODEL_FILE}); "
                "pass the --out folder of a `transferlab fit` run"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TransferlabError(f"{meta_path}: unreadable model description ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise TransferlabError(
                f"{meta_path}: format version {meta.get('format_version')} is not supported "
                f"by this transferlab (expects {FORMAT_VERSION})"
            )
        body = build_body(meta["body"]["recipe"])
        head = build_head(meta["head"])
        body.load_state_dict(_load_tensors(path / BODY_FILE))
        head.load_state_dict(_load_tensors(path / HEAD_FILE))
        net = ClassifierNet(body, head).eval()
        return cls(
            net=net,
            classes=list(meta["classes"]),
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            body=meta["body"],
            head=meta["head"],
            strategy=meta["strategy"],
            config=meta.get("config", {}),
            temperature=float(meta.get("temperature", 1.0)),
            versions=meta.get("versions", {}),
        )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TransferlabError(f"{path}: missing; the model folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise TransferlabError(f"{path}: corrupt or truncated weights file ({e})") from e


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a crash leaves the old file, never half a one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
