"""LogME: the fixed point reaches the maximum of the closed-form evidence, and ranks features."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from transferlab.errors import TransferlabError
from transferlab.selection.logme import evidence, logme


def _problem(n: int, d: int, classes: int = 3, signal: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    f = rng.normal(size=(n, d))
    f[:, :classes] += signal * np.eye(classes)[y]  # the first columns carry the label
    return f, y


def _brute_force_max(f: np.ndarray, target: np.ndarray, start: tuple[float, float]) -> float:
    """max over (α, β) of the n × n closed-form evidence, by a generic optimiser in log space."""
    res = minimize(
        lambda p: -evidence(f, target, np.exp(p[0]), np.exp(p[1])),
        x0=np.log(start) + 0.7,  # start away from the answer
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000},
    )
    return -float(res.fun)


@pytest.mark.parametrize(("n", "d"), [(60, 8), (25, 40)])  # more samples than features, and fewer
def test_fixed_point_is_the_maximum_of_the_closed_form_evidence(n, d):
    f, y = _problem(n, d)
    result = logme(f, y)
    assert len(result.classes) == 3
    for c, ce in enumerate(result.classes):
        target = (y == c).astype(np.float64)
        # the returned number is exactly the closed-form evidence at the returned α, β ...
        assert ce.evidence == pytest.approx(evidence(f, target, ce.alpha, ce.beta), abs=1e-8)
        # ... and no other (α, β) does better
        best = _brute_force_max(f, target, (ce.alpha, ce.beta))
        assert ce.evidence == pytest.approx(best, abs=1e-6)
    assert result.score == pytest.approx(np.mean([c.evidence for c in result.classes]))


def test_more_informative_features_score_higher():
    scores = [logme(*_problem(200, 32, signal=s, seed=1)).score for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert scores == sorted(scores) and scores[-1] - scores[0] > 0.5, scores
    # label-free noise appended to good features lowers the score (the evidence pays for them)
    f, y = _problem(200, 8, signal=2.0, seed=2)
    noisy = np.hstack([f, np.random.default_rng(3).normal(size=(200, 120))])
    assert logme(f, y).score > logme(noisy, y).score


def test_score_does_not_depend_on_row_order_or_feature_rotation():
    f, y = _problem(80, 12, seed=4)
    perm = np.random.default_rng(5).permutation(80)
    q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(12, 12)))  # the prior is isotropic
    base = logme(f, y).score
    assert logme(f[perm], y[perm]).score == pytest.approx(base, abs=1e-9)
    assert logme(f @ q, y).score == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros(5), np.zeros(5, dtype=int), "(n, d)"),
        (np.zeros((5, 2)), np.zeros(4, dtype=int), "one non-negative integer label"),
        (np.zeros((5, 2)), np.full(5, 0.5), "integer"),
        (np.full((5, 2), np.nan), np.zeros(5, dtype=int), "NaN"),
    ],
)
def test_bad_inputs_are_user_errors(features, labels, message):
    with pytest.raises(TransferlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        logme(features, labels)
