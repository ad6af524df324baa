"""LogME: how well a backbone's features suit a labelled dataset, without training a head.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning" (ICML
2021). Each class ``c`` gets a Bayesian linear regression of its one-hot target ``y_c`` on the
features ``F`` (n × d), with prior ``w ~ N(0, α⁻¹ I)`` and noise ``N(0, β⁻¹)``. Its log marginal
likelihood (evidence), maximised over ``α`` and ``β``, measures how well ``F`` explains the
labels; LogME is the mean over classes of ``evidence / n``. Higher = the features transfer better.

The maximisation is the paper's fixed point (Algorithm 1, MacKay's updates) on one SVD of ``F``
shared by every class, as in the authors' reference code (``LogME._fit_fixed_point``). Two
differences from that code, both so that the returned number is exactly the closed-form
evidence at the returned ``α``, ``β``: the final evidence is recomputed at the converged
``α / β`` (the reference evaluates it with the previous iterate's residual), and when ``d > n``
the ``d − rank`` zero singular directions contribute their ``log α`` to ``log |A|`` (the
reference drops them, which shifts every score by a class-independent amount).
Features are used as they come from the backbone, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transferlab.errors import TransferlabError

__all__ = ["ClassEvidence", "LogME", "evidence", "logme"]

_MAX_ITER = 100  # the fixed point typically converges in 2–5 steps; the paper stops at 11
_TOL = 1e-6  # relative change of α/β that counts as converged
_EPS = 1e-12  # keeps α and β finite when a residual or a weight vector is exactly zero


@dataclass(frozen=True)
class ClassEvidence:
    """One class's maximised evidence (per sample) and the hyper-parameters that reach it."""

    evidence: float
    alpha: float
    beta: float
    iterations: int


@dataclass(frozen=True)
class LogME:
    """LogME of a feature matrix for some labels: ``score`` and the per-class details."""

    score: float
    classes: tuple[ClassEvidence, ...]


def logme(features: np.ndarray, labels: np.ndarray) -> LogME:
    """LogME of ``features`` (n × d) for integer ``labels`` (n,) in ``0..C-1``; see the module."""
    f = _check(features, labels)
    y = np.asarray(labels).astype(np.int64)
    n, d = f.shape
    s2, u = _spectrum(f)
    per_class = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        x2 = (u.T @ target) ** 2  # squared projections on the left singular vectors
        rest = float(target @ target - x2.sum())  # the part of y outside F's column space
        per_class.append(_maximise(s2, x2, max(rest, 0.0), n, d))
    return LogME(float(np.mean([c.evidence for c in per_class])), tuple(per_class))


def evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """Closed-form log evidence per sample, ``log N(y | 0, β⁻¹I + α⁻¹FFᵀ) / n``, by brute force
    (an n × n determinant): the reference the fixed point is tested against, for small n."""
    f = np.asarray(f, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    quad = float(y @ np.linalg.solve(cov, y))
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet + quad) / n)


def _check(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) == 0:
        raise TransferlabError(f"LogME needs an (n, d) feature array; got shape {f.shape}")
    if y.shape != (len(f),) or y.dtype.kind not in "iu" or y.min() < 0:
        raise TransferlabError(
            f"LogME needs one non-negative integer label per feature row ({len(f)}); "
            f"got shape {y.shape}, dtype {y.dtype}"
        )
    if not np.all(np.isfinite(f)):
        raise TransferlabError("LogME: the features contain NaN or infinite values")
    return f


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared non-zero singular values of ``f`` and their left singular vectors (n × k).

    From the eigendecomposition of the smaller Gram matrix (min(n, d)² entries), several times
    faster than an SVD of ``f``; the precision lost on tiny singular values does not matter,
    as their terms in the evidence reduce to those of zero ones.
    """
    n, d = f.shape
    if n > d:
        s2, v = np.linalg.eigh(f.T @ f)
    else:
        s2, u = np.linalg.eigh(f @ f.T)
    keep = s2 > s2.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    s2 = s2[keep]
    if n > d:
        return s2, (f @ v[:, keep]) / np.sqrt(s2)
    return s2, u[:, keep]


def _maximise(s2: np.ndarray, x2: np.ndarray, rest: float, n: int, d: int) -> ClassEvidence:
    """MacKay's fixed point for α, β (Algorithm 1), then the evidence at the converged point."""
    alpha, beta, iterations = 1.0, 1.0, 0
    while iterations < _MAX_ITER:
        iterations += 1
        t = alpha / beta
        m2, res2 = _fit_terms(s2, x2, rest, t)
        gamma = float((s2 / (s2 + t)).sum())  # effective number of well-determined weights
        alpha = gamma / (m2 + _EPS)
        beta = max(n - gamma, _EPS) / (res2 + _EPS)
        if abs(alpha / beta - t) <= _TOL * t:
            break
    m2, res2 = _fit_terms(s2, x2, rest, alpha / beta)
    log_det = float(np.log(alpha + beta * s2).sum()) + (d - len(s2)) * np.log(alpha)
    ev = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det / 2
        - n / 2 * np.log(2 * np.pi)
    )
    return ClassEvidence(float(ev / n), float(alpha), float(beta), iterations)


def _fit_terms(s2: np.ndarray, x2: np.ndarray, rest: float, t: float) -> tuple[float, float]:
    """‖m‖² and ‖Fm − y‖² of the posterior mean at ``t = α/β``, in the singular basis."""
    m2 = float((s2 * x2 / (s2 + t) ** 2).sum())
    res2 = float((x2 * (t / (s2 + t)) ** 2).sum()) + rest
    return m2, res2
