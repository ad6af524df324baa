"""The statistics behind the reports, numpy only: confusion counts, confidence intervals,
calibration (reliability bins, ECE, temperature scaling) and McNemar's test.

Conventions are those of :mod:`transferlab.evaluation.metrics` (scikit-learn's where it has an
answer); every returned number is a plain Python ``int``/``float`` (or ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from transferlab.errors import TransferlabError

__all__ = [
    "balanced_accuracy_from_cm",
    "bootstrap_interval",
    "check_probs",
    "confusion",
    "expected_calibration_error",
    "fit_temperature",
    "mcnemar",
    "per_class_from_cm",
    "reliability_curve",
    "wilson_interval",
]

_SUM_TOL = 1e-3  # how far a probability row may sum from 1 (float32 softmax is ~1e-6 off)
# Temperature search range: outside it the model is either useless or the data separable, and
# an unbounded optimum would only return a numerically meaningless extreme.
_T_MIN, _T_MAX = 1e-2, 1e2
_EXACT_MCNEMAR_BELOW = 25


# --------------------------------------------------------------------------------------------
# counts


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def balanced_accuracy_from_cm(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur in ``y_true``."""
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def per_class_from_cm(cm: np.ndarray) -> dict[str, Any]:
    """Per-class precision/recall/F1/support arrays and their macro and weighted averages."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true counts
    predicted = cm.sum(axis=0).astype(np.float64)
    # np.divide with where= avoids both the warning and the nan of 0/0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(tp), where=pr > 0)
    seen = (support > 0) | (predicted > 0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "macro_precision": float(precision[seen].mean()),
        "macro_recall": float(recall[seen].mean()),
        "macro_f1": float(f1[seen].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
    }


def check_probs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (int64 labels, float64 probabilities), or a TransferlabError saying what's off."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise TransferlabError(f"probs must be (n, C) with C >= 2; got shape {probs.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probs):
        raise TransferlabError(
            f"y_true must be 1-D with one label per row of probs ({len(probs)}); "
            f"got shape {y_true.shape}"
        )
    if len(probs) == 0:
        raise TransferlabError("no samples to evaluate")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise TransferlabError(
            "probs must be finite and non-negative (pass softmax probabilities, not logits)"
        )
    if np.abs(probs.sum(axis=1) - 1.0).max() > _SUM_TOL:
        raise TransferlabError(
            "rows of probs must sum to 1 (pass softmax probabilities, not logits)"
        )
    if y_true.dtype.kind not in "iu" or y_true.min() < 0 or y_true.max() >= probs.shape[1]:
        raise TransferlabError(f"y_true must hold integer class indices in 0..{probs.shape[1] - 1}")
    return y_true.astype(np.int64), probs


# --------------------------------------------------------------------------------------------
# intervals


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (95% for the default ``z``).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is sensible at k = 0 or n;
    with ``n == 0`` nothing is known, so the interval is (0, 1).
    """
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise TransferlabError(f"wilson_interval needs 0 <= k <= n; got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at k = 0 / k = n the bound is exactly 0 / 1; round-off would give 1e-17 / 0.9999999999999999
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


_STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "accuracy": lambda cm: float(np.trace(cm) / cm.sum()),
    "balanced_accuracy": balanced_accuracy_from_cm,
    "macro_f1": lambda cm: per_class_from_cm(cm)["macro_f1"],
}


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    statistic: str | Callable[[np.ndarray, np.ndarray], float] = "accuracy",
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of (y_true, y_pred), resampling test items.

    ``statistic``: ``"accuracy"``, ``"balanced_accuracy"``, ``"macro_f1"`` or a callable
    ``f(y_true, y_pred) -> float``. Deterministic for a given ``seed``.
    """
    y_true = np.asarray(y_true).astype(np.int64, copy=False).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64, copy=False).ravel()
    n = len(y_true)
    if n == 0 or len(y_pred) != n:
        raise TransferlabError(
            f"bootstrap_interval needs equal, non-zero lengths; got {n} and {len(y_pred)}"
        )
    if n_boot < 1 or not 0 < confidence < 1:
        raise TransferlabError("bootstrap_interval needs n_boot >= 1 and 0 < confidence < 1")
    stats = _bootstrap_stats(y_true, y_pred, n_boot, np.random.default_rng(seed), statistic)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _bootstrap_stats(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    statistic: str | Callable[[np.ndarray, np.ndarray], float],
) -> np.ndarray:
    """The statistic on each of ``n_boot`` resamples (with replacement) of the items."""
    n = len(y_true)
    stats = np.empty(n_boot)
    if statistic == "accuracy":
        correct = (y_true == y_pred).astype(np.float64)
        # chunks keep memory at ~chunk * n indices instead of n_boot * n
        chunk = max(1, min(n_boot, 2_000_000 // n))
        for start in range(0, n_boot, chunk):
            m = min(chunk, n_boot - start)
            stats[start : start + m] = correct[rng.integers(0, n, size=(m, n))].mean(axis=1)
    elif isinstance(statistic, str):
        if statistic not in _STATISTICS:
            raise TransferlabError(
                f"unknown bootstrap statistic {statistic!r}; choose one of {', '.join(_STATISTICS)}"
            )
        fn = _STATISTICS[statistic]
        c = int(max(y_true.max(), y_pred.max())) + 1
        for i in range(n_boot):
            idx = rng.integers(0, n, size=n)
            stats[i] = fn(confusion(y_true[idx], y_pred[idx], c))
    else:
        for i in range(n_boot):
            idx = rng.integers(0, n, size=n)
            stats[i] = float(statistic(y_true[idx], y_pred[idx]))
    return stats


# --------------------------------------------------------------------------------------------
# calibration


def reliability_curve(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin mean confidence (max prob), accuracy and count over ``n_bins`` equal-width bins.

    Bins are ``(lo, hi]`` on [0, 1] (a confidence of exactly 0 goes into the first bin). Empty
    bins have ``None`` confidence/accuracy and count 0, so a plot can skip them.
    """
    y_true, probs = check_probs(y_true, probs)
    if n_bins < 1:
        raise TransferlabError(f"n_bins must be >= 1; got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "bin_confidence": [
            float(s / m) if m else None for s, m in zip(conf_sum, count, strict=True)
        ],
        "bin_accuracy": [float(s / m) if m else None for s, m in zip(acc_sum, count, strict=True)],
        "bin_count": count.astype(int).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE: sum over bins of (bin count / n) * |bin accuracy - bin mean confidence|."""
    curve = reliability_curve(probs, y_true, n_bins)
    n = sum(curve["bin_count"])
    return float(
        sum(
            m / n * abs(a - cf)
            for m, a, cf in zip(
                curve["bin_count"], curve["bin_accuracy"], curve["bin_confidence"], strict=True
            )
            if m
        )
    )


def _nll_grad(beta: float, logits: np.ndarray, y: np.ndarray) -> float:
    """d/d(beta) of the mean NLL of softmax(beta * logits): E_p[z] - z_y (monotone in beta)."""
    z = beta * logits
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return float(np.mean((p * logits).sum(axis=1) - logits[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (temperature scaling).

    In ``beta = 1 / T`` the NLL is convex (a log-sum-exp of linear functions minus a linear one),
    so its derivative is monotone and bisection on ``log beta`` finds the unique minimiser
    exactly and deterministically, with no step sizes to tune. The result is clipped to
    [0.01, 100]: on separable data the NLL keeps falling as ``T -> 0``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true)
    if logits.ndim != 2 or logits.shape[1] < 2 or y.shape != (len(logits),) or len(y) == 0:
        raise TransferlabError(
            f"fit_temperature needs logits (n, C>=2) and n labels; got {logits.shape}, {y.shape}"
        )
    if not np.all(np.isfinite(logits)):
        raise TransferlabError("logits must be finite")
    y = y.astype(np.int64)
    lo, hi = math.log(1.0 / _T_MAX), math.log(1.0 / _T_MIN)  # bounds on log(beta)
    if _nll_grad(math.exp(hi), logits, y) <= 0:
        return _T_MIN
    if _nll_grad(math.exp(lo), logits, y) >= 0:
        return _T_MAX
    for _ in range(80):  # interval width 9.2 / 2**80: far below float resolution
        mid = 0.5 * (lo + hi)
        if _nll_grad(math.exp(mid), logits, y) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / math.exp(0.5 * (lo + hi)))


# --------------------------------------------------------------------------------------------
# comparing two models on the same items


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's test of equal accuracy for two classifiers scored on the same items.

    ``b`` = items only A gets right, ``c`` = items only B gets right. With ``b + c < 25`` the
    exact two-sided binomial test (``statistic`` = min(b, c)); otherwise the chi-square test
    with continuity correction, ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.
    """
    a = np.asarray(correct_a).astype(bool).ravel()
    bb = np.asarray(correct_b).astype(bool).ravel()
    if len(a) != len(bb):
        raise TransferlabError(f"mcnemar needs equal lengths; got {len(a)} and {len(bb)}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    m = b + c
    if m < _EXACT_MCNEMAR_BELOW:
        # exact integer arithmetic: P(X <= min(b, c)) for X ~ Binomial(m, 1/2), doubled
        tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
        p = min(1.0, 2.0 * tail / 2**m)
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": p, "method": "exact"}
    stat = (abs(b - c) - 1.0) ** 2 / m
    # survival function of chi-square with 1 dof: P(Z^2 > s) = erfc(sqrt(s / 2))
    p = math.erfc(math.sqrt(stat / 2.0))
    return {"b": b, "c": c, "statistic": float(stat), "p_value": float(p), "method": "chi2"}
