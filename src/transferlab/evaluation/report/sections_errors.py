"""Where the model fails: the test images it gets most confidently wrong, and the training
labels an out-of-fold head disputes.

The label-error search fits five heads on cached training features, so on a large training set
it runs on a stratified, seeded sample of :data:`SUSPECT_ROWS` rows (the section says so): the
report's build time must not grow with the dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.evaluation import analysis
from transferlab.evaluation.report.context import RunContext
from transferlab.evaluation.report.render import GALLERY_PX, thumbnail_uri

#: Training rows the label-error search looks at, at most (plus a few per class; see
#: :func:`~transferlab.evaluation.analysis.stratified_sample`).
SUSPECT_ROWS = 2000
_FOLDS = 5
_SEED = 0


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


def suspects_section(ctx: RunContext, k: int, max_rows: int = SUSPECT_ROWS) -> dict[str, Any]:
    """The ``suspects.html`` section: training images whose label an out-of-fold linear head
    confidently disputes, searched among at most about ``max_rows`` of them."""
    train = ctx.resolve(("train",), digests=False).get("train")
    if train is None:
        raise TransferlabError("no training split")
    rows = analysis.stratified_sample(train.labels, max_rows, seed=_SEED, min_per_class=_FOLDS)
    sample = train
    if len(rows) < len(train):
        sample = Split(
            paths=[train.paths[i] for i in rows],
            labels=train.labels[rows],
            digests=[train.digests[i] for i in rows],
        )
    # only the sample's digests are looked up and only its features read from the cache
    sample = ctx.digested(sample)
    probs = analysis.train_out_of_fold_probs(ctx.clf, sample, folds=_FOLDS, seed=_SEED)
    found = analysis.suspect_labels(probs, sample.labels, sample.paths, k, classes=ctx.classes)
    sampled = len(sample) < len(train)
    return {
        "items": _gallery(found),
        "sampled": {"n": len(sample), "of": len(train), "seed": _SEED} if sampled else None,
        "unjudged": int((~np.isfinite(probs).all(axis=1)).sum()),
    }
