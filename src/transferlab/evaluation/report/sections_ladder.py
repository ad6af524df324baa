"""The ladder's comparison: accuracy per rung with its uncertainty, and McNemar's paired test
between the rungs still on disk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.evaluation import compare, plots
from transferlab.evaluation.report.render import figure_uri
from transferlab.evaluation.report.rungs import rung_path
from transferlab.runs import is_run_dir

LADDER_HEADER = (
    "rung", "what", "val accuracy", "test accuracy", "seconds", "epochs", "trainable params",
)  # fmt: skip


def _accuracy(r: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    """A rung's accuracy on ``split`` for the ``accuracy`` macro: the spread over seeds when
    it ran several (it says more than one run's CI), else the CI; None when unknown."""
    m = r.get(split)
    if not m or m.get("accuracy") is None:
        return None
    seeds = m.get("across_seeds")
    if seeds:
        return {"seeds": seeds, "n_seeds": len(r.get("runs") or []) or "?", "m": m}
    return {"seeds": None, "m": m}


def _rung_row(r: Mapping[str, Any]) -> dict[str, Any]:
    secs, params, epochs = r.get("seconds"), r.get("trainable_params"), r.get("epochs")
    return {
        "name": r.get("name", "?"),
        "description": r.get("description", ""),
        "val": _accuracy(r, "val"),
        "test": _accuracy(r, "test"),
        "seconds": "–" if secs is None else f"{float(secs):.1f}",
        "epochs": "–" if epochs is None else epochs,
        "params": "–" if params is None else f"{int(params):,}",
    }


def _paired_tests(lad: Mapping[str, Any]) -> dict[str, Any] | None:
    """McNemar between every two rungs whose run folders are still there (None: fewer)."""
    dirs = [(r.get("name"), rung_path(lad, r["run_dir"])) for r in lad["rungs"] if r.get("run_dir")]
    dirs = [(n, d) for n, d in dirs if is_run_dir(d)]
    if len(dirs) < 2:
        return None
    cmp = compare.compare_runs([d for _, d in dirs])
    label = {row["name"]: n for (n, _), row in zip(dirs, cmp["runs"], strict=True)}
    return {
        "note": cmp["note"],
        "pairs": [
            {**p, "a": label.get(p["a"], p["a"]), "b": label.get(p["b"], p["b"])}
            for p in cmp["mcnemar"]
        ],
    }


def ladder_section(lad: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ladder.html`` section: the chart, a row per rung, the paired tests."""
    rungs = lad["rungs"]
    if not rungs:
        raise TransferlabError("the ladder has no rungs")
    return {
        "png": figure_uri(plots.plot_compare, rungs, title="accuracy per rung (95% CI)"),
        "header": LADDER_HEADER,
        "rows": [_rung_row(r) for r in rungs],
        "paired": _paired_tests(lad),
    }
