"""Where the model fails: the test images it gets most confidently wrong, and the training
labels an out-of-fold head disputes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.errors import TransferlabError
from transferlab.evaluation import analysis
from transferlab.evaluation.report.context import RunContext
from transferlab.evaluation.report.render import GALLERY_PX, thumbnail_uri


def _gallery(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Thumbnails with true/predicted class, for the ``loss_gallery`` macro."""
    return [
        {
            "src": thumbnail_uri(r["path"], GALLERY_PX),
            "alt": Path(r["path"]).name,
            "label": r["label"],
            "predicted": r["predicted"],
            "p_pred": r["p_pred"],
            "p_true": r["p_true"],
        }
        for r in rows
    ]


def top_losses_section(ctx: RunContext, k: int) -> dict[str, Any]:
    """The ``top_losses.html`` section: the ``k`` highest-loss images of the detailed split."""
    name = ctx.eval_split()
    split = ctx.splits()[name]
    rows = analysis.top_losses(ctx.probs(name), split.labels, split.paths, k, classes=ctx.classes)
    return {"name": name, "items": _gallery(rows)}


def suspects_section(ctx: RunContext, k: int) -> dict[str, Any]:
    """The ``suspects.html`` section: training images whose label an out-of-fold linear head
    confidently disputes."""
    train = ctx.resolve(("train",)).get("train")
    if train is None:
        raise TransferlabError("no training split")
    probs = analysis.train_out_of_fold_probs(ctx.clf, train, folds=5, seed=0)
    rows = analysis.suspect_labels(probs, train.labels, train.paths, k, classes=ctx.classes)
    return {"items": _gallery(rows)}
