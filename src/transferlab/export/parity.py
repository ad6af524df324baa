"""The check every export passes before it is written: the same top-1 as eager PyTorch and
probabilities within :data:`PARITY_ATOL`, or the export is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transferlab.errors import TransferlabError
from transferlab.runtime.parity import PARITY_ATOL

__all__ = ["parity", "refuse_unless_parity"]


def parity(reference: np.ndarray, got: np.ndarray, engine: str) -> dict[str, Any]:
    """How far ``got`` (from ``engine``) is from the eager ``reference`` probabilities."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - got))) if reference.size else 0.0
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    agree = int((ref_top == got_top).sum())
    # A disagreement is only excusable where PyTorch itself has a tie within the tolerance.
    srt = np.sort(reference, axis=1)
    margin = srt[:, -1] - srt[:, -2] if reference.shape[1] > 1 else np.ones(len(reference))
    real = int(((ref_top != got_top) & (margin > 2 * PARITY_ATOL)).sum())
    return {
        "engine": engine,
        "reference": "eager PyTorch",
        "n": int(len(reference)),
        "max_abs_diff": diff,
        "top1_agree": agree,
        "ok": bool(diff <= PARITY_ATOL and real == 0),
    }


def refuse_unless_parity(p: dict[str, Any], fmt: str, out: Path) -> None:
    """Raise unless the :func:`parity` result ``p`` is ok (``out`` is then left unwritten)."""
    if not p["ok"]:
        raise TransferlabError(
            f"the {fmt} export disagrees with PyTorch (max |Δp| {p['max_abs_diff']:.2e}, "
            f"top-1 agreement {p['top1_agree']}/{p['n']}); nothing was written to {out}"
        )
