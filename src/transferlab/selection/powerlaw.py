"""A learning curve's power law, ``error(n) = a · n^(−b) + c``, and what it says about more data.

``n`` is images per class, ``c`` the error that no amount of data removes (for this model and
recipe). The fit is least squares on every measured (size, seed) error (scipy's
``curve_fit``, ``a ≥ 0``, ``0.01 ≤ b ≤ 3``, ``0 ≤ c ≤`` the smallest measured error). Its
uncertainty is a bootstrap that redoes the whole measurement in miniature: at each size the
seeds are resampled with replacement and each chosen run's error is redrawn as a binomial
proportion of the evaluation set (so even one seed gets an interval from the finite test set).

:meth:`PowerLaw.images_per_class_for` inverts the law: ``n = (a / (1 − acc − c))^(1/b)`` (at
least 1), with the bootstrap's 95% percentile interval; an estimate outside the measured sizes
is flagged as an extrapolation, and an accuracy at or beyond ``1 − c`` (or needing over 1000×
the largest measured size) as unreachable by more data of this kind.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from transferlab.errors import TransferlabError

__all__ = ["PowerLaw", "fit_power_law"]

_N_BOOT = 300
_HORIZON = 1000
_LOG_MAX = 700.0  # exp() of more is not a float


def _law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.power(n, -b) + c


@dataclass(frozen=True)
class PowerLaw:
    """A fitted ``error(n) = a · n^(−b) + c`` with bootstrap replicates of ``(a, b, c)``."""

    a: float
    b: float
    c: float
    sizes: tuple[float, ...]  # the measured images per class
    boot: np.ndarray  # (replicates, 3)

    def error(self, n: float | np.ndarray) -> np.ndarray:
        return _law(np.asarray(n, dtype=np.float64), self.a, self.b, self.c)

    def accuracy(self, n: float | np.ndarray) -> np.ndarray:
        return 1.0 - self.error(n)

    def images_per_class_for(self, accuracy: float) -> dict[str, Any]:
        """Images per class estimated to reach ``accuracy``: the estimate (None when the law
        never reaches it), its 95% interval (an end is None when unbounded), whether it lies
        outside the measured sizes, and the sizes measured."""
        if not 0 < accuracy < 1:
            raise TransferlabError(f"target accuracy {accuracy!r}: give a fraction in (0, 1)")
        est = _invert(self.a, self.b, self.c, accuracy)
        reps = np.array([_invert(a, b, c, accuracy) for a, b, c in self.boot])
        # Order statistics, not interpolation: replicates that never reach it are infinite.
        lo, hi = np.quantile(reps, [0.025, 0.975], method="inverted_cdf") if len(reps) else (
            math.inf, math.inf)  # fmt: skip
        lo_n, hi_n = min(self.sizes), max(self.sizes)
        # Past 1000× the data the law is no evidence of anything: say "unbounded" instead.
        est, lo, hi = (x if x <= _HORIZON * hi_n else math.inf for x in (est, lo, hi))
        return {
            "accuracy": accuracy,
            "images_per_class": _finite(est),
            "ci95": [_finite(lo), _finite(hi)],
            "reachable": math.isfinite(est),
            "extrapolated": not (lo_n <= est <= hi_n),
            "measured": [lo_n, hi_n],
        }

    def to_dict(self, targets: tuple[float, ...] = ()) -> dict[str, Any]:
        spread = np.percentile(self.boot, [2.5, 97.5], axis=0) if len(self.boot) else None
        return {
            "formula": "error(n) = a * n^(-b) + c, n = images per class",
            "a": self.a, "b": self.b, "c": self.c,
            "ci95": None if spread is None else {
                k: [float(spread[0, i]), float(spread[1, i])] for i, k in enumerate("abc")
            },
            "bootstrap_replicates": len(self.boot),
            "sizes": list(self.sizes),
            "targets": [self.images_per_class_for(t) for t in targets],
        }  # fmt: skip


def fit_power_law(
    sizes: np.ndarray, errors: np.ndarray, n_eval: int, *, seed: int = 0, n_boot: int = _N_BOOT
) -> PowerLaw | None:
    """Fit the law to ``errors`` (sizes × seeds) measured on ``n_eval`` images; None when there
    are fewer than three sizes (three parameters), no error at all (nothing to extrapolate) or
    the fit fails."""
    sizes = np.asarray(sizes, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    if len(np.unique(sizes)) < 3 or errors.shape[0] != len(sizes) or not errors.any():
        return None
    point = _fit(sizes, errors)
    if point is None:
        return None
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        pick = rng.integers(0, errors.shape[1], size=errors.shape)
        drawn = rng.binomial(n_eval, np.take_along_axis(errors, pick, axis=1)) / n_eval
        fitted = _fit(sizes, drawn)
        if fitted is not None:
            reps.append(fitted)
    return PowerLaw(
        *point, sizes=tuple(float(s) for s in sizes), boot=np.array(reps).reshape(-1, 3)
    )


def _fit(sizes: np.ndarray, errors: np.ndarray) -> tuple[float, float, float] | None:
    x = np.repeat(sizes, errors.shape[1])
    y = errors.ravel()
    c_max = max(float(y.min()), 1e-9)
    a0 = max(float(y[x == x.min()].mean()) * float(x.min()) ** 0.5, 1e-6)
    try:
        with warnings.catch_warnings():
            # an exact fit (three sizes, one seed) has no covariance: expected, not a problem
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(
                _law, x, y, p0=(a0, 0.5, c_max / 2),
                bounds=([0.0, 0.01, 0.0], [np.inf, 3.0, c_max]), maxfev=5000,
            )  # fmt: skip
    except (RuntimeError, ValueError):
        return None
    return float(params[0]), float(params[1]), float(params[2])


def _invert(a: float, b: float, c: float, accuracy: float) -> float:
    gap = (1.0 - accuracy) - c
    if gap <= 0:
        return math.inf
    # At least one image per class: a law that is already there below that is a flat curve,
    # and "1e-50 images" would only be the arithmetic of extrapolating it.
    if a <= 0:
        return 1.0
    log_n = math.log(a / gap) / b  # in logs: a nearly flat law (tiny b) overflows a power
    return math.inf if log_n > _LOG_MAX else max(1.0, math.exp(log_n))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
