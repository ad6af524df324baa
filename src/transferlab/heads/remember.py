"""Fitted heads kept in the cache, so a re-fit on unchanged features costs no head fit.

A head fit is deterministic (one thread, a seeded RNG, float32 on CPU), so the head fitted on
the same features, labels and options is the same bytes every time: at 20k images that repeat
is 3.7 s of a warm re-fit's 7 s. The key covers everything the head's bytes come from: the
training and validation features (a digest of their float32 bytes, not of the images they came
from, so features recomputed on another engine are another key), the labels, the fit's
arguments, the code of this package and the torch and numpy versions. A damaged entry is a
miss, and a miss only costs the fit.

Layout: ``<cache>/heads/<key>.json`` (spec + history) and ``<key>.safetensors`` (the module's
state dict); ``transferlab cache prune`` trims them with the rest of the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.errors import TransferlabError
from transferlab.heads.base import FittedHead, build_head
from transferlab.storage import code_digest, load_tensors, save_tensors, write_json

__all__ = ["HEADS_DIR", "features_digest", "head_key", "keep_head", "recall_head"]

HEADS_DIR = "heads"  # the heads' folder in the cache
_FORMAT = 1


def features_digest(chunks: Iterable[np.ndarray]) -> str:
    """SHA-256 of float32 feature rows given a chunk at a time (the digest of the whole matrix,
    however it is chunked: a streamed pass and an in-memory matrix give the same)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(np.ascontiguousarray(chunk, dtype=np.float32))
    return h.hexdigest()


def head_key(*parts: Any) -> str:
    """The key of a head fitted from ``parts`` (feature digests, label bytes, fit arguments)."""
    h = hashlib.sha256(repr((_FORMAT, _code_digest(), torch.__version__, np.__version__)).encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@functools.cache
def _code_digest() -> str:
    here = Path(__file__).parent
    return code_digest(*sorted(here.glob("*.py")), here.parent / "training.py")


def _paths(cache_root: Path, key: str) -> tuple[Path, Path]:
    return cache_root / HEADS_DIR / f"{key}.json", cache_root / HEADS_DIR / f"{key}.safetensors"


def recall_head(cache_root: Path, key: str) -> FittedHead | None:
    """The head kept under ``key``, or None (absent or damaged)."""
    meta, weights = _paths(cache_root, key)
    try:
        kept = json.loads(meta.read_text(encoding="utf-8"))
        if kept.get("format") != _FORMAT:
            return None
        module = build_head(kept["spec"])
        module.load_state_dict(load_tensors(weights))
    except Exception:  # noqa: BLE001 - any damage (truncated JSON or weights, a wrong shape) is a miss
        return None
    module.eval()
    return FittedHead(module=module, spec=kept["spec"], history=kept["history"])


def keep_head(cache_root: Path, key: str, fitted: FittedHead) -> None:
    """Keep ``fitted`` under ``key``; a cache that cannot be written only costs the next fit."""
    meta, weights = _paths(cache_root, key)
    with contextlib.suppress(OSError, TransferlabError):
        meta.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(fitted.module.state_dict(), weights)  # weights first: the JSON marks it done
        write_json(meta, {"format": _FORMAT, "spec": fitted.spec, "history": fitted.history})
