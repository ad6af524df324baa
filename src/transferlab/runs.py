"""The run folder: every file name a run or a ladder writes, and how a model is saved and loaded.

A saved model is a folder of plain files, loadable without executing code:

    model.json          classes, preprocessing, body recipe, head spec, strategy, seed, versions
    body.safetensors    the body's weights (always copied, so a model never depends on the
                        folder or hub it was trained from; ~9 MB for MobileNetV2)
    head.safetensors    the head's weights
    metrics.json, data.json, history.json, history.csv, checkpoints/, curves.png, report.html,
    predictions.csv     written beside them by fit, evaluate and report (as applicable)

The body's *identity* (spec + weights hash + preprocessing; see ``Backbone.identity``) is
recorded: an untouched pretrained body keeps the identity of the weights it came from, so
features cached at training time are reused by ``evaluate``/``predict`` after loading.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.engine import BEST_CKPT, CHECKPOINT_DIR, HISTORY_CSV, LAST_CKPT
from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.model import ClassifierNet, build_body
from transferlab.preprocess import Preprocess
from transferlab.storage import atomic_write_text, load_tensors, read_json, save_tensors
from transferlab.system import library_versions

__all__ = [
    "BEST_CKPT", "BODY_FILE", "CHECKPOINT_DIR", "COMPARE_FILE", "COMPARE_PNG", "CURVES_PNG",
    "DATA_FILE", "FORMAT_VERSION", "HEAD_FILE", "HISTORY_CSV", "HISTORY_FILE", "LADDER_FILE",
    "LADDER_MD", "LADDER_PNG", "LAST_CKPT", "METRICS_FILE", "MODEL_FILE", "PREDICTIONS_FILE",
    "REPORT_FILE", "SavedModel", "is_run_dir", "read_run_json",
]  # fmt: skip

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
BODY_FILE = "body.safetensors"
HEAD_FILE = "head.safetensors"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.json"
CURVES_PNG = "curves.png"
REPORT_FILE = "report.html"
PREDICTIONS_FILE = "predictions.csv"
LADDER_FILE = "ladder.json"
LADDER_MD = "ladder.md"
LADDER_PNG = "ladder.png"
COMPARE_FILE = "compare.json"
COMPARE_PNG = "compare.png"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder written by ``fit`` (it holds ``model.json``)."""
    return (Path(path) / MODEL_FILE).is_file()


def read_run_json(run: str | os.PathLike, name: str, default: Any = None) -> Any:
    """One of a run folder's JSON files; ``default`` when it is missing (unreadable: an error)."""
    return read_json(Path(run) / name, default)


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
        save_tensors(self.net.body.state_dict(), out / BODY_FILE)
        save_tensors(self.net.head.state_dict(), out / HEAD_FILE)
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
        path = Path(path)
        meta = _read_meta(path)
        body = build_body(meta["body"]["recipe"])
        head = build_head(meta["head"])
        body.load_state_dict(load_tensors(path / BODY_FILE))
        head.load_state_dict(load_tensors(path / HEAD_FILE))
        return cls(
            net=ClassifierNet(body, head).eval(),
            classes=list(meta["classes"]),
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            body=meta["body"],
            head=meta["head"],
            strategy=meta["strategy"],
            config=meta.get("config", {}),
            temperature=float(meta.get("temperature", 1.0)),
            versions=meta.get("versions", {}),
        )


def _read_meta(path: Path) -> dict[str, Any]:
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
    return meta
