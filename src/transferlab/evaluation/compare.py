"""Comparing runs: accuracy with 95% CIs per run, and McNemar's test on per-image correctness
when the runs were scored on the same test images."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

import transferlab
from transferlab.config import FitConfig
from transferlab.data.prepared import PreparedData
from transferlab.errors import TransferlabError
from transferlab.evaluation.analysis import load_predictions
from transferlab.evaluation.metrics import classification_report, mcnemar
from transferlab.evaluation.plots import plot_compare
from transferlab.evaluation.run_data import prepare_run_data, resolve_splits
from transferlab.evaluation.scoring import split_logits
from transferlab.model import softmax
from transferlab.runs import COMPARE_FILE, COMPARE_PNG, METRICS_FILE, MODEL_FILE, is_run_dir
from transferlab.storage import read_json

__all__ = ["compare_runs"]


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Accuracy with 95% CIs per run, and pairwise McNemar tests on a shared test set.

    Accuracies come from each run's ``metrics.json`` (or, with ``data``, from re-scoring the
    run on that folder's test split). McNemar needs per-image correctness on the *same*
    images: it is taken from ``data`` (each run scored on it) or from the runs'
    ``predictions.csv`` (written by their reports); runs are compared only when their test
    image sets are identical, which is what makes the test paired (and far more sensitive than
    comparing two overlapping CIs). ``data`` is scanned as ``fit`` scans it
    (:func:`prepare_run_data`): unusable files are skipped and listed (``"skipped"``, and per
    run). With ``out``, ``compare.json`` and ``compare.png`` are written there. Returns
    ``{"runs": [...], "shared_test": bool, "mcnemar": [...], "note": str,
    "chart": path | None, "skipped": [{"path", "reason"}, ...]}``.
    """
    dirs = [Path(r) for r in run_dirs]
    if len(dirs) < 1:
        raise TransferlabError("give at least one run folder to compare")
    for d in dirs:
        if not is_run_dir(d):
            raise TransferlabError(f"{d}: not a transferlab run folder (no {MODEL_FILE})")
    names = _run_names(dirs)
    runs: list[dict[str, Any]] = []
    correct: dict[str, dict[str, bool]] = {}  # run name -> {test path: correct}
    scanned: dict[tuple[Any, ...], PreparedData] = {}  # one scan per distinct split recipe
    skipped: dict[str, str] = {}  # path -> reason, over every scan
    for d, name in zip(dirs, names, strict=True):
        row = _run_row(d, name)
        if data is not None:
            correct[name] = _score_on_data(d, data, row, scanned, skipped)
        else:
            from_csv = _correct_from_predictions(d)
            if from_csv is not None:
                correct[name] = from_csv
        runs.append(row)
    shared, pairs, note = _mcnemar_pairs(names, correct)
    result: dict[str, Any] = {
        "runs": runs,
        "shared_test": shared,
        "mcnemar": pairs,
        "note": note,
        "chart": None,
        # unusable files of ``data``, left out of every score (as fit leaves them out)
        "skipped": [{"path": p, "reason": r} for p, r in skipped.items()],
    }
    if out is not None:
        _write(result, Path(out))
    return result


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in run_dirs]
    # two runs called "latest" in different folders: fall back to parent/name
    return [
        f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n
        for p, n in zip(run_dirs, names, strict=True)
    ]


def _summary(m: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not m or "accuracy" not in m:
        return None
    return {
        "accuracy": float(m["accuracy"]),
        "accuracy_ci95": [float(v) for v in m["accuracy_ci95"]],
        "n": int(m["n"]),
    }


def _run_row(run: Path, name: str) -> dict[str, Any]:
    model = read_json(run / MODEL_FILE)
    metrics = read_json(run / METRICS_FILE) or {}
    return {
        "name": name,
        "run_dir": str(run),
        "strategy": _strategy_label(model),
        "backbone": model.get("body", {}).get("spec"),
        "val": _summary(metrics.get("val")),
        "test": _summary(metrics.get("test")),
    }


def _strategy_label(model: Mapping[str, Any]) -> str | None:
    """``features (linear)`` and ``features (mlp)`` are different runs: name the head too."""
    strategy, head = model.get("strategy"), (model.get("head") or {}).get("kind")
    return f"{strategy} ({head})" if strategy in ("features", "frozen") and head else strategy


def _split_recipe(config: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What decides a run's splits and skipped files on a folder: runs that agree share a scan."""
    cfg = FitConfig.from_dict(dict(config)) if config else FitConfig()
    return (
        cfg.label_regex,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.seed,
        cfg.max_pixels,
        cfg.strict,
    )


def _score_on_data(
    run: Path,
    data: str | os.PathLike[str],
    row: dict[str, Any],
    scanned: dict[tuple[Any, ...], PreparedData],
    skipped: dict[str, str],
) -> dict[str, bool]:
    """Re-score ``run`` on ``data``'s test split (into ``row``); per-image correctness."""
    clf = transferlab.load(run)
    key = _split_recipe(clf.saved.config)
    if key not in scanned:
        scanned[key] = prepare_run_data(data, clf.saved.config)
    prepared = scanned[key]
    splits = resolve_splits(run, ("test",), classes=clf.classes, prepared=prepared)
    if "test" not in splits:
        raise TransferlabError(f"{data}: no test split to compare the runs on")
    s = splits["test"]
    row["skipped"] = [{"path": p, "reason": r} for p, r in prepared.skipped]
    skipped.update(prepared.skipped)
    probs = softmax(split_logits(clf, s), clf.saved.temperature)
    row["test"] = _summary(classification_report(s.labels, probs, clf.classes))
    row["test_source"] = str(data)
    ok = probs.argmax(axis=1) == s.labels
    return dict(zip(s.paths, ok.tolist(), strict=True))


def _correct_from_predictions(run: Path) -> dict[str, bool] | None:
    pred = load_predictions(run, "test")
    if pred is None:
        return None
    return {
        p: lab == pr
        for p, lab, pr in zip(pred["paths"], pred["labels"], pred["predicted"], strict=True)
    }


def _mcnemar_pairs(
    names: list[str], correct: dict[str, dict[str, bool]]
) -> tuple[bool, list[dict[str, Any]], str]:
    """(shared test set?, pairwise McNemar results, a note saying what was tested)."""
    tests = [frozenset(correct[n]) if n in correct else None for n in names]
    shared = len(names) > 1 and tests[0] is not None and all(t == tests[0] for t in tests)
    if not shared:
        if len(names) < 2:
            return False, [], "one run: nothing to test against"
        if any(t is None for t in tests):
            return (
                False,
                [],
                (
                    "no per-image test predictions for some runs (no predictions.csv); pass --data "
                    "to score them all on one test set for McNemar's test"
                ),
            )
        return (
            False,
            [],
            "the runs were tested on different images: McNemar's test needs the same ones",
        )
    order = sorted(tests[0])  # align by path, whatever order each run listed them in
    pairs = []
    for a, b in combinations(names, 2):
        res = mcnemar(
            np.array([correct[a][p] for p in order]), np.array([correct[b][p] for p in order])
        )
        pairs.append(
            {
                "a": a,
                "b": b,
                "only_a_correct": res["b"],
                "only_b_correct": res["c"],
                "statistic": res["statistic"],
                "p_value": res["p_value"],
                "method": res["method"],
            }
        )
    return True, pairs, f"McNemar's test on the same {len(order)} test images"


def _write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(r["val"] or r["test"] for r in result["runs"]):
        plot_compare(result["runs"], title="accuracy per run (95% CI)", out=out_dir / COMPARE_PNG)
        result["chart"] = str(out_dir / COMPARE_PNG)
    (out_dir / COMPARE_FILE).write_text(json.dumps(result, indent=2))
