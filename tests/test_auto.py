"""fit --strategy auto: a choice among strategies within a time budget, made on val, recorded."""

from __future__ import annotations

import json
import math

import pytest

import transferlab
from conftest import tiny_fit_options
from transferlab.errors import TransferlabError
from transferlab.selection.auto import _parsimonious


def test_auto_within_a_small_budget_keeps_the_features_head(tiny_dataset, tmp_path):
    """A budget too small for fine-tuning: the ranked backbone's features head is saved, the
    skipped fine-tuning is said with its estimate, and the run loads and predicts as any run."""
    run = tmp_path / "run"
    clf = transferlab.fit(tiny_dataset, out=run, strategy="auto", time_budget="0.001s", epochs=1,
                          **tiny_fit_options(tmp_path), verbose=False)  # fmt: skip
    record = json.loads((run / "auto.json").read_text())
    assert record["time_budget_s"] == 0.001
    assert record["chosen"]["strategy"] == "features" == clf.saved.strategy
    tried = {r["strategy"]: r for r in record["tried"]}
    assert "s left" in tried["finetune"]["skipped"]
    # one backbone and no fine-tuning: one model, nothing to ensemble
    assert record["ensemble"] == {"tried": False, "kept": False, "backbone": "mobilenetv2_035",
                                  "skipped": "one model only: nothing to ensemble"}  # fmt: skip
    assert [c["backbone"] for c in record["ranking"]["candidates"]] == ["mobilenetv2_035"]
    assert "test" not in json.dumps(record["tried"])  # chosen on val, test never read
    again = transferlab.load(run)
    assert again.metrics["auto"]["chosen"] == record["chosen"]
    from transferlab.evaluation.report import build_report

    page = build_report(run, gradcam=0).read_text()
    assert "Auto: what was tried and why" in page and "features on mobilenetv2_035" in page
    assert len(again.predict(str(tiny_dataset / "test"))) == 4


def test_auto_tries_finetuning_when_the_budget_allows_and_keeps_the_better(tiny_dataset, tmp_path):
    clf = transferlab.fit(tiny_dataset, strategy="auto", time_budget=600, epochs=1,
                          **tiny_fit_options(tmp_path), verbose=False)  # fmt: skip
    auto = clf.metrics["auto"]
    rows = {r["strategy"]: r for r in auto["tried"]}
    assert set(rows) == {"features", "finetune", "ensemble"}
    assert "skipped" not in rows["finetune"] and "skipped" not in rows["ensemble"]
    # the ensemble of the two (one backbone: the features head and the fine-tuned network)
    assert rows["ensemble"]["members"] == [
        f"{r['strategy']} on mobilenetv2_035"
        for r in sorted((rows["features"], rows["finetune"]),
                        key=lambda r: (r["val_accuracy"], -r["val_log_loss"]), reverse=True)
    ]  # fmt: skip
    best = max((rows["features"], rows["finetune"]),
               key=lambda r: (r["val_accuracy"], -r["val_log_loss"]))  # fmt: skip
    # one backbone: the features head is the cheaper, kept when within one s.e. of the best
    n_val = clf.metrics["val"]["n"]
    se = math.sqrt(best["val_accuracy"] * (1 - best["val_accuracy"]) / n_val)
    single = (
        rows["features"] if rows["features"]["val_accuracy"] >= best["val_accuracy"] - se else best
    )
    kept = rows["ensemble"]["reason"].startswith("kept")
    best = rows["ensemble"] if kept else single
    assert auto["chosen"]["strategy"] == best["strategy"] == clf.saved.strategy
    assert clf.metrics["val"]["accuracy"] == pytest.approx(best["val_accuracy"])


def test_a_bad_budget_is_refused_before_any_work(tiny_dataset, tmp_path):
    with pytest.raises(TransferlabError, match="time_budget"):
        transferlab.fit(tiny_dataset, strategy="auto", time_budget="soon",
                        **tiny_fit_options(tmp_path))  # fmt: skip


def test_the_cheapest_model_within_one_standard_error_of_the_best_is_kept():
    """90/100 vs 88/100 on val is noise (s.e. 0.03): the faster backbone's features head wins;
    a lead beyond one s.e. (90 vs 80) keeps the best; no val split keeps the best."""

    def row(strategy, backbone, acc, nll):
        return object(), {"strategy": strategy, "backbone": backbone, "val_accuracy": acc,
                          "val_log_loss": nll, "score": (acc, -nll)}  # fmt: skip

    rates = {"slow": 70.0, "fast": 110.0}
    scored = [row("features", "fast", 0.88, 0.36), row("features", "slow", 0.89, 0.33),
              row("finetune", "slow", 0.90, 0.33)]  # fmt: skip
    chosen = _parsimonious(scored, rates, n_val=100)
    assert chosen is scored[0] and "one standard error" in chosen[1]["why"]
    scored[0][1].update(val_accuracy=0.80, score=(0.80, -0.36))
    assert _parsimonious(scored, rates, n_val=100) is scored[1]  # same speed: features first
    assert _parsimonious(scored, rates, n_val=0) is scored[2]
