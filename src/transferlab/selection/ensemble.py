"""An ensemble of trained models for ``fit --strategy auto``: the weighted average of their
probabilities, with the weights chosen on val.

The ensemble is a :class:`~transferlab.model.ClassifierNet` like any other (see
:mod:`transferlab.model`): its body runs every member on the one uint8 image (each cut to its
own eval crop, resized to its own size and normalized with its own mean/std) and returns their
logits side by side; its head averages their probabilities. The val pass runs that very body
on its runtime (ONNX Runtime/OpenVINO, parity-checked as every body is), so the weights are
chosen on exactly what is saved, exported and served, not on features cached at each member's
own preprocessing.

The weights minimise val log loss over a grid on the simplex (step :data:`GRID_STEP`): a proper
score, smoother on a few hundred images than accuracy, which would pick among ties at random.
Weights fitted on val flatter the ensemble on val (the endpoints are its members, so its fitted
log loss is never worse than theirs), so whether it is worth keeping is judged on a cross-fitted
score instead (:func:`cross_fitted`): weights chosen on one half of val score the other half.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from transferlab.backbones import Backbone
from transferlab.backbones.identity import short_name
from transferlab.config import FitConfig
from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.heads import AVERAGE, build_head
from transferlab.model import (
    ENSEMBLE,
    ClassifierNet,
    EnsembleBody,
    EnsembleMember,
    ensemble_preprocess,
)
from transferlab.preprocess import Preprocess
from transferlab.progress import progress
from transferlab.storage import state_digest
from transferlab.strategies import StrategyResult, feature_extractor

__all__ = [
    "GRID_STEP", "Ensemble", "EnsembleParts", "choose_weights", "cross_fitted", "ensemble_parts",
    "ensemble_seconds", "fit_ensemble",
]  # fmt: skip

GRID_STEP = 0.05
# Per member, on top of the images: exporting the ensemble body to ONNX and checking it.
_SETUP_S = 5.0


@dataclass
class Ensemble:
    """The ensemble as a strategy result (what fit saves; None when the val-optimal weights
    leave a member out), and how it scored on val."""

    result: StrategyResult | None
    weights: list[float]
    val_accuracy: float  # of ``weights`` on the val they were chosen on
    val_log_loss: float
    cv_accuracy: float  # out of fold: what choosing the weights on val is worth (cross_fitted)
    cv_log_loss: float


def ensemble_seconds(images: int, images_per_s: list[float]) -> float:
    """The estimated cost of running an ensemble on ``images`` (every member on each), from
    the members' measured extraction rates, plus the export of its body."""
    return sum(images / max(rate, 1e-9) + _SETUP_S for rate in images_per_s)


@dataclass
class EnsembleParts:
    """An ensemble before its weights: the body (members' logits side by side), its
    preprocessing, and model.json's body entry."""

    body: EnsembleBody
    preprocess: Preprocess
    record: dict[str, Any]
    members: int
    classes: int

    def backbone(self) -> Backbone:
        """The body as a frozen backbone: what the feature runtime and cache take."""
        return Backbone(
            spec=self.record["spec"],
            model=self.body,
            preprocess=self.preprocess,
            num_features=self.members * self.classes,
            weights_hash=self.record["weights_hash"],
            pretrained=False,
        )

    def result(self, weights: list[float], val_logits: np.ndarray | None = None) -> StrategyResult:
        """The ensemble with ``weights`` (positive, summing to 1) as a strategy result; with
        ``val_logits`` (the body's output on val) its val probabilities come along."""
        spec = {
            "kind": AVERAGE,
            "in_features": self.members * self.classes,
            "num_classes": self.classes,
            "weights": list(weights),
            "chosen_on": f"val log loss, simplex grid step {GRID_STEP}",
        }
        record = {**self.record, "members": [dict(m) for m in self.record["members"]]}
        for member, w in zip(record["members"], weights, strict=True):
            member["weight"] = w
        probs = {}
        if val_logits is not None:
            probs["val"] = _average(val_logits, np.asarray(weights), self.members)
        return StrategyResult(
            net=ClassifierNet(self.body, build_head(spec)).eval(),
            preprocess=self.preprocess,
            body=record,
            head=spec,
            probs=probs,
            info={"strategy": ENSEMBLE, "weights": list(weights), "members": record["members"]},
        )


def ensemble_parts(members: list[StrategyResult], strategies: list[str]) -> EnsembleParts:
    """The members' ensemble body, its preprocessing and its record. ``strategies``: how each
    member was trained (recorded). The record holds the members' recipes, heads and
    preprocessing (``body.recipe``, to rebuild them) and their specs."""
    body = EnsembleBody([EnsembleMember(m.net.body, m.net.head, m.preprocess) for m in members])
    body.eval()
    return EnsembleParts(
        body=body,
        preprocess=ensemble_preprocess([m.preprocess for m in members]),
        record=_body_record(members, strategies, body),
        members=len(members),
        classes=int(members[0].head["num_classes"]),
    )


def fit_ensemble(
    members: list[StrategyResult], strategies: list[str], val: Split, config: FitConfig
) -> Ensemble:
    """The members' ensemble with weights chosen on ``val`` (see the module docstring)."""
    parts = ensemble_parts(members, strategies)
    logits = _val_logits(feature_extractor(parts.backbone(), config), val)
    weights, acc, nll = choose_weights(logits, val.labels, parts.members)
    scores = (acc, nll, *cross_fitted(logits, val.labels, parts.members))
    if min(weights) == 0:  # one member does as well alone: nothing to save as an ensemble
        return Ensemble(None, weights, *scores)
    return Ensemble(parts.result(weights, logits), weights, *scores)


def _body_record(
    members: list[StrategyResult], strategies: list[str], body: EnsembleBody
) -> dict[str, Any]:
    """model.json's body entry of an ensemble. ``trained``: its features are the members'
    logits, fitted to the training labels (so, e.g., no label-noise search on them)."""
    return {
        "spec": "ensemble:" + "+".join(short_name(m.body["spec"]) for m in members),
        "recipe": {
            "kind": ENSEMBLE,
            "members": [
                {"body": m.body["recipe"], "head": m.head, "preprocess": m.preprocess.to_dict()}
                for m in members
            ],
        },
        "weights_hash": state_digest(body),
        "trained": True,
        "members": [
            {
                "spec": m.body["spec"],
                "strategy": strategy,
                "weights_hash": m.body.get("weights_hash"),
                "trained": bool(m.body.get("trained", False)),
                "input_size": list(m.preprocess.input_size),
            }
            for m, strategy in zip(members, strategies, strict=True)
        ],
    }


def _val_logits(extractor: Any, val: Split) -> np.ndarray:
    """Every member's logits on val, side by side (n, K·C): the ensemble body's own output."""
    with progress(len(val), "ensemble [val]") as advance:
        got = extractor(val.paths, val.digests, on_progress=advance)
    if got.failures:  # the scan decoded every file a moment ago: it changed since
        path, reason = got.failures[0]
        raise TransferlabError(f"{path}: {reason} (the file changed during the run?)")
    return np.asarray(got.features, dtype=np.float64)


def _member_probs(logits: np.ndarray, k: int) -> np.ndarray:
    """(n, K·C) logits → (K, n, C) probabilities, one softmax per member."""
    z = logits.reshape(len(logits), k, -1).transpose(1, 0, 2)
    z = z - z.max(axis=2, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=2, keepdims=True)


def _average(logits: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    return np.einsum("k,knc->nc", weights, _member_probs(logits, k))


def simplex_grid(k: int, step: float = GRID_STEP) -> np.ndarray:
    """Every weight vector of ``k`` entries ≥ 0 summing to 1 in multiples of ``step``."""
    n = round(1 / step)
    rows = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in rows], dtype=np.float64) / n


def choose_weights(
    logits: np.ndarray, labels: np.ndarray, k: int
) -> tuple[list[float], float, float]:
    """The grid weights with the lowest log loss on (``logits``, ``labels``) (ties: the higher
    accuracy, then the more even weights); returns (weights, accuracy, log loss)."""
    probs = _member_probs(logits, k)
    y = np.asarray(labels)
    best: tuple[tuple[float, float, float], np.ndarray, float, float] | None = None
    for w in simplex_grid(k):
        p = np.einsum("k,knc->nc", w, probs)
        nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())
        acc = float((p.argmax(axis=1) == y).mean())
        key = (round(nll, 9), -acc, float(np.abs(w - 1 / k).sum()))  # 1e-9: float noise ties
        if best is None or key < best[0]:
            best = (key, w, acc, nll)
    assert best is not None
    return [round(float(v), 6) for v in best[1]], best[2], best[3]


def cross_fitted(
    logits: np.ndarray, labels: np.ndarray, k: int, folds: int = 2, seed: int = 0
) -> tuple[float, float]:
    """(accuracy, log loss) of the weight choice out of fold: val split in ``folds`` stratified,
    seeded parts, each scored with the weights :func:`choose_weights` picks on the others."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold[rows] = (np.arange(len(rows)) + int(c)) % folds  # the classes' remainders spread
    probs = _member_probs(logits, k)
    out = np.empty(probs.shape[1:])
    for f in range(folds):
        w, _, _ = choose_weights(logits[fold != f], y[fold != f], k)
        out[fold == f] = np.einsum("k,knc->nc", np.asarray(w), probs[:, fold == f])
    nll = float(-np.log(np.clip(out[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    return float((out.argmax(axis=1) == y).mean()), nll
