"""Fitted heads kept in the cache, so a re-fit on unchanged features costs no head fit.

A head fit is deterministic (one thread, a seeded RNG, float32 on CPU), so the head fitted on
the same features, labels and options is the same bytes every time: at 20k images that repeat
is 3.7 s of a warm re-fit's 7 s. The key covers everything the head's bytes come from: the
training and validation features (a digest of their float32 bytes, not of the images they came
from, so features recomputed on another engine are another key), the labels, the fit's
arguments, the code of this package, the torch and numpy versions and the CPU's kind. A damaged
entry is a miss, and a miss only costs the fit.

Layout: ``<cache>/heads/<key>.json`` (spec + history) and ``<key>.safetensors`` (the module's
state dict); ``transferlab cache prune`` trims them with the rest of the cache.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.heads.base import FittedHead, build_head
from transferlab.storage import (
    code_digest,
    keep_with_tensors,
    load_tensors,
    read_with_tensors,
    value_digest,
)

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
    """The key of a head fitted from ``parts`` (feature digests, label bytes, fit arguments).
    The CPU's instruction set is part of it: a cache shared by machines whose float kernels
    differ (AVX2, AVX-512) keeps one head per kind of machine."""
    machine = (platform.machine(), torch.backends.cpu.get_cpu_capability())
    env = (_FORMAT, _code_digest(), torch.__version__, np.__version__, machine)
    return value_digest(env, parts)[:32]


@functools.cache
def _code_digest() -> str:
    here = Path(__file__).parent
    return code_digest(*sorted(here.glob("*.py")), here.parent / "training.py")


def _meta_path(cache_root: Path, key: str) -> Path:
    return cache_root / HEADS_DIR / f"{key}.json"


def recall_head(cache_root: Path, key: str) -> FittedHead | None:
    """The head kept under ``key``, or None (absent or damaged)."""
    kept = read_with_tensors(_meta_path(cache_root, key))
    if kept is None or kept[0].get("format") != _FORMAT:
        return None
    meta, weights = kept
    try:
        module = build_head(meta["spec"])
        module.load_state_dict(load_tensors(weights))
    except Exception:  # noqa: BLE001 - any damage (a bad spec, weights, a wrong shape) is a miss
        return None
    module.eval()
    return FittedHead(module=module, spec=meta["spec"], history=meta["history"])


def keep_head(cache_root: Path, key: str, fitted: FittedHead) -> None:
    """Keep ``fitted`` under ``key``; a cache that cannot be written only costs the next fit."""
    meta = {"format": _FORMAT, "spec": fitted.spec, "history": fitted.history}
    keep_with_tensors(_meta_path(cache_root, key), meta, fitted.module.state_dict())
