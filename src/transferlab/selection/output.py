"""What ``rank`` and ``curve`` write: their output folder's guard, file names and rank's chart."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.backbones.identity import short_name
from transferlab.errors import TransferlabError
from transferlab.figures import figure_bytes, new_figure
from transferlab.storage import atomic_write_bytes

__all__ = ["RANK_FILE", "RANK_PNG", "check_study_folder", "plot_rank"]

RANK_FILE = "rank.json"
RANK_PNG = "rank.png"


def check_study_folder(
    out: str | os.PathLike, marker: str, *, overwrite: bool, command: str
) -> None:
    """Refuse, before any work, an ``--out`` that is a file, holds something other than an
    earlier ``command`` result (recognised by its ``marker`` file), or holds one and
    ``overwrite`` is off: the same rules as ``fit``'s run folders."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TransferlabError(f"--out {out} is a file; give a folder (nothing written)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / marker).is_file():
        raise TransferlabError(
            f"--out {out} holds other files, not a transferlab {command} result; give a new or "
            "empty folder (nothing written)"
        )
    if not overwrite:
        raise TransferlabError(
            f"--out {out} holds a {command} result already ({marker}); pass --overwrite to "
            "replace it, or give another folder"
        )


def plot_rank(report: Mapping[str, Any], out: Path) -> Path:
    """Two bar charts, candidates in rank order: LogME, and CV accuracy with its 95% CI."""
    cands = list(report["candidates"])[::-1]  # barh draws bottom-up; the best goes on top
    names = [short_name(c["backbone"]) for c in cands]
    fig = new_figure((10, 1.2 + 0.45 * len(cands)))
    ax_logme, ax_acc = fig.subplots(1, 2, sharey=True)
    ax_logme.barh(names, [c["logme"] for c in cands], color="#1f77b4")
    ax_logme.set_xlabel("LogME (higher transfers better)")
    acc = [c["cv_accuracy"] for c in cands]
    err = [[a - c["cv_ci95"][0] for a, c in zip(acc, cands, strict=True)],
           [c["cv_ci95"][1] - a for a, c in zip(acc, cands, strict=True)]]  # fmt: skip
    ax_acc.barh(names, acc, xerr=err, color="#ff7f0e", capsize=3)
    low = min(c["cv_ci95"][0] for c in cands)
    ax_acc.set_xlim(max(0.0, low - 0.05), 1.0)
    ax_acc.set_xlabel(f"{report['folds']}-fold linear-probe accuracy (95% CI)")
    fig.suptitle(f"rank on {report['data']} (train + val only)")
    fig.tight_layout()
    atomic_write_bytes(out, figure_bytes(fig))
    return out
