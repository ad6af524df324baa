"""The ladder runs rungs on shared splits and leaves a loadable model per rung."""

from __future__ import annotations

import json

import numpy as np
import pytest

import transferlab
from test_api import TINY, photo_dataset
from transferlab.errors import TransferlabError
from transferlab.ladder import ladder


@pytest.fixture
def data(tmp_path):
    return photo_dataset(tmp_path / "data", (("train", 10), ("val", 5), ("test", 5)))


def test_quick_ladder_writes_summary_charts_and_loadable_rungs(data, tmp_path):
    out = tmp_path / "ladder"
    report = ladder(
        data,
        out=out,
        rungs=["scratch-basic", "features-linear"],
        quick=True,
        backbone=TINY,
        pretrained=False,
        engine="torch",
        cache_dir=str(tmp_path / "cache"),
        workers=0,
    )
    saved = json.loads((out / "ladder.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["name"] for r in saved["rungs"]] == ["scratch-basic", "features-linear"]
    scratch, linear = saved["rungs"]
    assert scratch["epochs"] == 2 and scratch["trainable_params"] > linear["trainable_params"]
    assert linear["test"]["accuracy"] >= 0.9
    for r in saved["rungs"]:
        lo, hi = r["test"]["accuracy_ci95"]
        assert lo <= r["test"]["accuracy"] <= hi
        # Each rung is an ordinary run folder: it loads and predicts.
        clf = transferlab.load(r["run_dir"])
        preds = clf.predict([data / "test" / "red"])
        assert len(preds) == 5
    table = (out / "ladder.md").read_text()
    assert "| scratch-basic |" in table and "| features-linear |" in table
    assert (out / "ladder.png").stat().st_size > 1000
    assert (out / "scratch-basic" / "curves.png").is_file()


def test_seeds_report_mean_and_sd(data, tmp_path):
    report = ladder(
        data,
        out=tmp_path / "l",
        rungs=["features-mlp"],
        seeds=2,
        backbone=TINY,
        pretrained=False,
        engine="torch",
        cache_dir=str(tmp_path / "cache"),
        workers=0,
    )
    rung = report["rungs"][0]
    assert [r["seed"] for r in rung["runs"]] == [42, 43]
    accs = [r["test"]["accuracy"] for r in rung["runs"]]
    assert rung["test"]["across_seeds"]["mean"] == pytest.approx(np.mean(accs))


def test_unknown_rung_is_a_user_error(data, tmp_path):
    with pytest.raises(TransferlabError, match="unknown rung"):
        ladder(data, out=tmp_path / "x", rungs=["magic"])


@pytest.mark.slow
def test_tracked_ladder_logs_a_parent_and_one_child_per_rung(data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in requirements.txt")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rungs = ["features-linear", "features-mlp"]
    ladder(
        data, out=tmp_path / "ladder", rungs=rungs, quick=True, track="mlflow", backbone=TINY,
        pretrained=False, engine="torch", cache_dir=str(tmp_path / "cache"), workers=0,
    )  # fmt: skip
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("transferlab")
    found = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == rungs
    assert len(found) == 3 and parent.info.status == "FINISHED"
    for child in children:
        assert child.info.status == "FINISHED"
        m = child.data.metrics
        for key in ("val_accuracy", "test_accuracy", "test_accuracy_ci95_low",
                    "test_accuracy_ci95_high", "time_total_s"):  # fmt: skip
            assert key in m, (child.info.run_name, key)
        assert parent.data.metrics[f"{child.info.run_name}.test_accuracy"] == m["test_accuracy"]
        assert child.data.params["config.track"] == "mlflow"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"report.html", "head.safetensors", "provenance.json"} <= artifacts
    assert {"ladder.json", "ladder.md"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}  # fmt: skip
