"""A ladder's rungs as the report sees them: the ladder file, and which rung it details."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.runs import LADDER_FILE, is_run_dir
from transferlab.storage import read_json


def load_ladder(ladder: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A ladder description: the dict itself, a ``ladder.json`` path or its folder."""
    if isinstance(ladder, Mapping):
        d = dict(ladder)
    else:
        p = Path(ladder)
        p = p / LADDER_FILE if p.is_dir() else p
        d = read_json(p)
        if not isinstance(d, dict):
            raise TransferlabError(f"{p}: no {LADDER_FILE}" if d is None else f"{p}: not a ladder")
        d.setdefault("_dir", str(p.parent))
    if not isinstance(d.get("rungs"), list):
        raise TransferlabError("a ladder needs a 'rungs' list")
    return d


def _val_accuracy(rung: Mapping[str, Any]) -> float | None:
    """A rung's val accuracy: the mean over seeds when it ran several, else its one run's."""
    m = rung.get("val") or {}
    seeds = m.get("across_seeds") or {}
    v = seeds.get("mean", m.get("accuracy"))
    return None if v is None else float(v)


def _by_val(ladder: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rungs with a val accuracy, best first; equal ones keep the ladder's order."""
    scored = [(acc, r) for r in ladder["rungs"] if (acc := _val_accuracy(r)) is not None]
    return [r for _, r in sorted(scored, key=lambda t: -t[0])]  # sorted() is stable


def best_rung(ladder: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ladder's best rung: highest val accuracy (the mean over seeds when a rung ran
    several), the earlier rung on a tie; None when no rung has a val accuracy.

    Chosen on val only, never on test: picking the winner by its test score would make that
    score optimistic, and the test split is what reports the chosen rung honestly. The report
    details this rung, and the CLI names it, by this one rule.
    """
    ranked = _by_val(ladder)
    return ranked[0] if ranked else None


def best_rung_dir(ladder: Mapping[str, Any]) -> Path | None:
    """The folder of the best rung (:func:`best_rung`) still on disk; without val accuracies,
    the first rung on disk in ladder order."""
    for r in [*_by_val(ladder), *ladder["rungs"]]:
        if r.get("run_dir"):
            p = rung_path(ladder, r["run_dir"])
            if is_run_dir(p):
                return p
    return None


def rung_path(ladder: Mapping[str, Any], run_dir: str) -> Path:
    """A rung's run folder; ``ladder.json`` may store it relative to the ladder's folder."""
    p = Path(run_dir)
    if not p.is_absolute() and "_dir" in ladder and not p.exists():
        p = Path(ladder["_dir"]) / p
    return p
