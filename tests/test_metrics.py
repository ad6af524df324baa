"""Metrics against scikit-learn / scipy references and known closed-form values."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from rich.console import Console
from scipy import stats
from sklearn import metrics as skm

from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import (
    bootstrap_interval,
    classification_report,
    expected_calibration_error,
    fit_temperature,
    format_report_table,
    mcnemar,
    reliability_curve,
    roc_auc_binary,
    wilson_interval,
)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def random_case(n: int, c: int, seed: int):
    """Labels and probabilities that are informative but far from perfect."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)) * 1.5
    logits[np.arange(n), y] += 1.0
    return y, softmax(logits)


@pytest.mark.parametrize("c", [2, 3, 6])
def test_report_matches_sklearn(c):
    y, p = random_case(400, c, seed=c)
    classes = [f"class_{i}" for i in range(c)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings from our side
        rep = classification_report(y, p, classes)
    pred = p.argmax(1)
    assert rep["n"] == 400
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=range(c))
    for i, name in enumerate(classes):
        row = rep["per_class"][name]
        assert row["precision"] == pytest.approx(prec[i])
        assert row["recall"] == pytest.approx(rec[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == sup[i]
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert rep["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    np.testing.assert_allclose(
        rep["confusion_matrix_normalized"], skm.confusion_matrix(y, pred, normalize="true")
    )
    assert rep["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=range(c)), rel=1e-9)
    if c == 2:
        assert rep["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
        assert rep["top_k_accuracy"] == {}
    else:
        assert rep["roc_auc"] is None
        assert list(rep["top_k_accuracy"]) == [str(k) for k in range(2, min(5, c - 1) + 1)]
        for k, acc in rep["top_k_accuracy"].items():
            expected = skm.top_k_accuracy_score(y, p, k=int(k), labels=range(c))
            assert acc == pytest.approx(expected)
    lo, hi = rep["accuracy_ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(int(round(rep["accuracy"] * 400)), 400))
    assert rep["ci_method"] == "wilson"
    assert rep["ece"] == pytest.approx(expected_calibration_error(p, y))
    json.dumps(rep, allow_nan=False)  # JSON-able, no NaN


def test_roc_auc_handles_ties_like_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) * 0.5 + 0.3 * y, 1)  # heavy ties
    assert roc_auc_binary(y, scores) == pytest.approx(skm.roc_auc_score(y, scores))
    assert roc_auc_binary([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc_binary([1, 1], [0.2, 0.3]) is None


def test_never_predicted_and_absent_classes_give_zero_without_warnings():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array(
        [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = classification_report(y, p, ["a", "b", "c"])
    assert rep["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["confusion_matrix_normalized"][2] == [0.0, 0.0, 0.0]
    # class c is neither present nor predicted: left out of macro and balanced averages
    assert rep["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    pred = p.argmax(1)
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_report_rejects_logits_and_bad_shapes():
    y, p = random_case(20, 3, seed=2)
    with pytest.raises(TransferlabError, match="not logits"):
        classification_report(y, np.log(p), ["a", "b", "c"])
    with pytest.raises(TransferlabError, match="sum to 1"):
        classification_report(y, p * 0.5, ["a", "b", "c"])
    with pytest.raises(TransferlabError, match="class names"):
        classification_report(y, p, ["a", "b"])
    with pytest.raises(TransferlabError, match="one label per row"):
        classification_report(y[:-1], p, ["a", "b", "c"])
    with pytest.raises(TransferlabError, match="ci must be"):
        classification_report(y, p, ["a", "b", "c"], ci="normal")


def test_bootstrap_ci_option_in_report():
    y, p = random_case(300, 4, seed=3)
    rep = classification_report(y, p, list("abcd"), ci="bootstrap")
    assert rep["ci_method"] == "bootstrap"
    lo, hi = rep["accuracy_ci95"]
    assert lo < rep["accuracy"] < hi


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-4)
    assert hi == pytest.approx(0.8749, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(TransferlabError):
        wilson_interval(5, 3)


def test_bootstrap_interval_covers_estimate_narrows_and_is_deterministic():
    rng = np.random.default_rng(4)

    def case(n):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 3)
        return y, pred

    y_small, p_small = case(100)
    y_big, p_big = case(3000)
    lo_s, hi_s = bootstrap_interval(y_small, p_small, n_boot=1000)
    lo_b, hi_b = bootstrap_interval(y_big, p_big, n_boot=1000)
    assert lo_s <= np.mean(y_small == p_small) <= hi_s
    assert lo_b <= np.mean(y_big == p_big) <= hi_b
    assert (hi_b - lo_b) < 0.5 * (hi_s - lo_s)
    assert bootstrap_interval(y_small, p_small, n_boot=500, seed=7) == bootstrap_interval(
        y_small, p_small, n_boot=500, seed=7
    )
    # other statistics, including a callable, agree with their point estimates
    bal = skm.balanced_accuracy_score(y_small, p_small)
    lo, hi = bootstrap_interval(y_small, p_small, n_boot=300, statistic="balanced_accuracy")
    assert lo <= bal <= hi
    mf1 = skm.f1_score(y_small, p_small, average="macro")
    lo, hi = bootstrap_interval(y_small, p_small, n_boot=300, statistic="macro_f1")
    assert lo <= mf1 <= hi
    lo2, hi2 = bootstrap_interval(
        y_small,
        p_small,
        n_boot=300,
        statistic=lambda t, q: skm.f1_score(t, q, average="macro", labels=[0, 1, 2]),
    )
    assert lo2 <= mf1 <= hi2
    with pytest.raises(TransferlabError, match="statistic"):
        bootstrap_interval(y_small, p_small, statistic="auc")


def test_ece_zero_for_calibrated_and_known_for_overconfident():
    # 80% confidence, right 80% of the time; 60% confidence, right 60% of the time
    y = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    p = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # always 90% sure, right half the time
    y = np.array([0, 1] * 10)
    p = np.tile([0.9, 0.1], (20, 1))
    assert expected_calibration_error(p, y) == pytest.approx(0.4)
    curve = reliability_curve(p, y)
    assert sum(curve["bin_count"]) == 20 and len(curve["bin_count"]) == 15
    b = int(np.argmax(curve["bin_count"]))
    assert curve["bin_confidence"][b] == pytest.approx(0.9)
    assert curve["bin_accuracy"][b] == pytest.approx(0.5)
    assert curve["bin_confidence"][0] is None  # empty bins are None, not NaN
    json.dumps(curve, allow_nan=False)


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(5)
    n, c = 20_000, 5
    true_logits = rng.standard_normal((n, c)) * 2.0
    probs = softmax(true_logits)
    # labels drawn from the model's own probabilities: calibrated at T = 1 by construction
    y = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    overconfident = true_logits * 3.0
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)

    def nll(z):
        return skm.log_loss(y, softmax(z), labels=range(c))

    assert nll(overconfident / t) < nll(overconfident)
    assert nll(overconfident / t) <= nll(overconfident / (t * 1.05))
    assert nll(overconfident / t) <= nll(overconfident / (t / 1.05))
    assert fit_temperature(overconfident, y) == t  # deterministic
    # perfectly separable data: NLL keeps falling as T -> 0, so the lower bound is returned
    sep = np.eye(3)[np.arange(30) % 3] * 5.0
    assert fit_temperature(sep, np.arange(30) % 3) == pytest.approx(0.01)


def test_mcnemar_exact_and_chi_square_branches():
    def outcomes(b, c, both=20, neither=5):
        a = [1] * b + [0] * c + [1] * both + [0] * neither
        bb = [0] * b + [1] * c + [1] * both + [0] * neither
        return np.array(a, bool), np.array(bb, bool)

    r = mcnemar(*outcomes(10, 2))
    assert (r["b"], r["c"], r["method"]) == (10, 2, "exact")
    assert r["p_value"] == pytest.approx(0.0386, abs=1e-4)
    assert r["p_value"] == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue)

    r = mcnemar(*outcomes(30, 12))
    assert r["method"] == "chi2"
    assert r["statistic"] == pytest.approx((18 - 1) ** 2 / 42)
    assert r["p_value"] == pytest.approx(stats.chi2.sf((18 - 1) ** 2 / 42, df=1))

    r = mcnemar(*outcomes(0, 0))
    assert r["p_value"] == 1.0
    r = mcnemar(*outcomes(12, 12))  # 24 discordant: still exact, symmetric -> p = 1
    assert r["method"] == "exact" and r["p_value"] == 1.0
    assert mcnemar(*outcomes(13, 12))["method"] == "chi2"
    with pytest.raises(TransferlabError):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_format_report_table_renders_classes_and_accuracy_line():
    y, p = random_case(200, 3, seed=6)
    classes = ["cat", "dog", "fox"]
    rep = classification_report(y, p, classes)
    table = format_report_table(rep, classes, title="test split")
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    for name in ("test split", "cat", "dog", "fox", "macro avg", "balanced accuracy", "95% CI"):
        assert name in text
    assert f"{rep['per_class']['dog']['f1']:.3f}" in text
    assert f"{rep['accuracy']:.1%}" in text
    assert math.isfinite(rep["balanced_accuracy"])
    # the summary is one whole line, not a caption wrapped and padded to the table's width
    (line,) = [row for row in text.splitlines() if "balanced accuracy" in row]
    assert line.startswith("accuracy ") and line.endswith(f"n = {rep['n']}")
