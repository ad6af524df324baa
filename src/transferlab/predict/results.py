"""What ``Classifier.predict`` returns: a small typed result per picture, a list of them, and
both as a pandas DataFrame (one row per input: source, label, probability, top-k columns)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferlab.errors import TransferlabError

__all__ = ["ImagePrediction", "Predictions", "make_result", "ranked_count", "ranking", "to_frame"]

# The mapping keys of the list-of-dicts results this replaced; older callers index by them.
_KEYS = ("path", "label", "probability", "top_k", "error")


@dataclass(frozen=True)
class ImagePrediction:
    """One input's prediction: ``label`` and its ``probability``, the ``top_k`` ranking
    [(class, probability), ...], every class's probability in ``probs`` (``clf.classes``
    order); or ``error`` (and no label) when the input could not be read."""

    source: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    probs: np.ndarray | None = field(default=None, repr=False, compare=False)
    error: str | None = None

    @property
    def path(self) -> str:
        return self.source

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        if key == "error":
            return self.error is not None
        return key in _KEYS and (key == "path" or self.error is None)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _KEYS if k in self}

    def to_pandas(self) -> Any:
        return to_frame([self])


class Predictions(list):
    """A list of :class:`ImagePrediction`, in input order, with ``to_pandas()``."""

    def to_pandas(self) -> Any:
        return to_frame(self)

    @property
    def labels(self) -> list[str | None]:
        return [p.label for p in self]


def to_frame(preds: Iterable[ImagePrediction]) -> Any:
    """A DataFrame with one row per prediction: source, label, probability, then ``top1`` /
    ``top1_probability`` … for the ranking, and ``error`` when any input failed."""
    try:
        import pandas as pd
    except ImportError:
        raise TransferlabError(
            "to_pandas() / as_frame=True need pandas: pip install pandas "
            "(or pip install 'transferlab[notebook]')"
        ) from None
    rows = []
    preds = list(preds)
    for p in preds:
        row: dict[str, Any] = {"source": p.source, "label": p.label, "probability": p.probability}
        for i, (lab, q) in enumerate(p.top_k, 1):
            row[f"top{i}"], row[f"top{i}_probability"] = lab, q
        if any(q.error for q in preds):
            row["error"] = p.error
        rows.append(row)
    return pd.DataFrame(rows, columns=_columns(rows))


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols = ["source", "label", "probability"]
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


def make_result(source: str, probs: np.ndarray | None, error: str | None, classes: list[str],
                top_k: int) -> ImagePrediction:  # fmt: skip
    """The typed result of one input (``probs`` in ``classes`` order, or None with ``error``)."""
    if probs is None:
        return ImagePrediction(source, error=error or "unreadable")
    ranked = ranking(probs, classes, top_k)
    return ImagePrediction(source, ranked[0][0], ranked[0][1], ranked, probs)


def ranked_count(top_k: int, num_classes: int) -> int:
    """How many ranked labels ``top_k`` gives: at most the number of classes; below 1 (or not
    a whole number) is an error rather than a silent 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise TransferlabError(f"top_k (--top-k) takes a whole number >= 1, not {top_k!r}")
    return min(int(top_k), num_classes)


def ranking(probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` most probable classes (see :func:`ranked_count`), most probable first."""
    order = np.argsort(-probs, kind="stable")[: ranked_count(top_k, len(classes))]
    return [(classes[i], float(probs[i])) for i in order]
