"""--track mlflow: a fit logged to a local MLflow store, read back with MLflow's own client."""

from __future__ import annotations

import json
import sys

import pytest

import transferlab
from conftest import TINY_BACKBONE, tiny_fit_options
from transferlab.errors import TransferlabError

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in requirements.txt")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def _runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("transferlab")
    assert exp is not None, "no transferlab experiment was created"
    return client.search_runs([exp.experiment_id])


def test_fit_logs_params_epoch_metrics_final_cis_tags_and_artifacts(tiny_dataset, tmp_path, store):
    out = tmp_path / "run"
    clf = transferlab.fit(
        tiny_dataset, out=out, track="mlflow", strategy="frozen", epochs=2, patience=None,
        **tiny_fit_options(tmp_path),
    )  # fmt: skip
    (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.strategy"] == "frozen" and params["config.track"] == "mlflow"
    assert params["config.epochs"] == "2"
    assert params["backbone.spec"] == TINY_BACKBONE
    assert params["backbone.weights_hash"] == clf.saved.body["weights_hash"]
    assert len(params["data.digest"]) == 64 and params["data.images"] == "16"
    tags = run.data.tags
    assert tags["strategy"] == "frozen" and tags["dataset"] == tiny_dataset.name
    metrics = run.data.metrics
    test = clf.metrics["test"]
    assert metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert metrics["test_accuracy_ci95_low"] == pytest.approx(test["accuracy_ci95"][0])
    assert metrics["test_accuracy_ci95_high"] == pytest.approx(test["accuracy_ci95"][1])
    assert "val_accuracy" in metrics and "time_total_s" in metrics
    losses = store.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [row["epoch"] for row in clf.history]
    assert len(losses) == 2
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"model.json", "head.safetensors", "body.safetensors", "metrics.json",
            "provenance.json", "files.json", "curves.png"} <= artifacts  # fmt: skip
    record = json.loads((out / "tracking.json").read_text())
    assert record["run_id"] == run.info.run_id
    assert transferlab.load(out).classes == ["a", "b"]  # tracking.json does not break the seal


def test_track_without_mlflow_says_how_to_install(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if absent
    with pytest.raises(TransferlabError, match="pip install mlflow"):
        transferlab.fit(
            tiny_dataset, out=tmp_path / "r", track="mlflow", **tiny_fit_options(tmp_path)
        )


def test_unknown_tracker_is_a_config_error(tiny_dataset, tmp_path):
    with pytest.raises(TransferlabError, match="track.*wandb.*mlflow"):
        transferlab.fit(tiny_dataset, track="wandb", **tiny_fit_options(tmp_path))


def test_track_does_not_make_resume_refuse():
    from transferlab.config import FitConfig
    from transferlab.engine.checkpoint import resume_config

    assert resume_config(FitConfig(track="mlflow")) == resume_config(FitConfig())


def test_cli_fit_track_option_logs_to_the_env_store(tiny_dataset, tmp_path, store):
    from typer.testing import CliRunner

    from transferlab.cli import app

    args = ["fit", str(tiny_dataset), "--out", str(tmp_path / "run"), "--track", "mlflow",
            "--backbone", TINY_BACKBONE, "--no-pretrained", "--engine", "torch", "--workers", "0",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = _runs(store)
    assert run.data.params["config.track"] == "mlflow" and "test_accuracy" in run.data.metrics


def test_unreachable_store_is_one_error_and_the_run_is_kept(tiny_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    with pytest.raises(TransferlabError, match="--track mlflow: logging to .* failed"):
        transferlab.fit(tiny_dataset, out=out, track="mlflow", **tiny_fit_options(tmp_path))
    assert transferlab.load(out).classes == ["a", "b"]
