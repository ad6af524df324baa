"""Provenance: the input manifest, the environment record, run-file digests, `verify`, and that
no command writes into the data folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import transferlab
from conftest import make_image, tiny_fit_options
from transferlab import provenance, runs
from transferlab.cli import app
from transferlab.errors import TransferlabError

runner = CliRunner()


@pytest.fixture
def run_and_data(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    transferlab.fit(tiny_dataset, out=out, **tiny_fit_options(tmp_path))
    return out, tiny_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    """Every path under root (folders too) with its content digest and mode: any write shows."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            seen[str(p.relative_to(root))] = f"{content}:{st.st_mode:o}:{st.st_mtime_ns}"
    return seen


def test_names_agree_with_runs():
    assert provenance.MODEL_FILE == runs.MODEL_FILE
    assert set(provenance._WEIGHTS) == {runs.BODY_FILE, runs.HEAD_FILE}


def test_run_folder_records_inputs_environment_and_digests(run_and_data):
    out, data = run_and_data
    prov = json.loads((out / provenance.PROVENANCE_FILE).read_text())
    files = prov["inputs"]["files"]
    assert len(files) == 16  # 8 per class over train/val/test
    first = files[0]
    assert set(first) == {"path", "size", "sha256", "split", "label"}
    assert first["sha256"] == hashlib.sha256((data / first["path"]).read_bytes()).hexdigest()
    assert first["size"] == (data / first["path"]).stat().st_size
    assert first["path"].split("/")[0] == first["split"]
    assert prov["project"]["version"] == transferlab.__version__
    env = prov["environment"]
    assert env["libraries"]["torch"] and env["threads"]["torch"] >= 1
    assert env["engines_used"] == ["torch"]
    sealed = json.loads((out / provenance.FILES_FILE).read_text())["files"]
    for name in ("model.json", "body.safetensors", "head.safetensors", "metrics.json",
                 "provenance.json"):  # fmt: skip
        assert sealed[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()


def test_verify_names_added_removed_changed_and_tampered_head(run_and_data, tmp_path):
    out, data = run_and_data
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.output
    changed = data / "train" / "a" / "a_train_0.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    (data / "val" / "b" / "b_val_1.jpg").unlink()
    make_image(data / "test" / "a" / "new.jpg", seed=99)
    check = provenance.verify_data(out)
    assert check.added == ["test/a/new.jpg"]
    assert check.removed == ["val/b/b_val_1.jpg"]
    assert check.changed == ["train/a/a_train_0.jpg"]
    head = out / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-1] ^= 0xFF
    head.write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["run"]["changed"] == ["head.safetensors"]
    assert report["data"]["added"] == ["test/a/new.jpg"]
    with pytest.raises(TransferlabError, match="head.safetensors"):
        transferlab.load(out)


def test_load_warns_on_edited_or_corrupt_records_and_refuses_half_written(run_and_data, capsys):
    out, _ = run_and_data
    (out / "metrics.json").write_text("{not json")
    clf = transferlab.load(out)  # the model still loads: predict needs only model + weights
    err = capsys.readouterr().err
    assert "metrics.json" in err
    assert clf.metrics == {}
    (out / provenance.FILES_FILE).unlink()  # a save that stopped before its seal
    with pytest.raises(TransferlabError, match="half-written"):
        transferlab.load(out)


def test_unsealed_old_run_still_loads(run_and_data):
    out, _ = run_and_data
    (out / provenance.FILES_FILE).unlink()
    (out / provenance.PROVENANCE_FILE).unlink()
    assert transferlab.load(out).classes == ["a", "b"]


def test_no_command_writes_into_the_data_folder(run_and_data, tmp_path):
    out, data = run_and_data
    before = _tree_digest(data)
    env = {"TRANSFERLAB_CACHE": str(tmp_path / "cache")}
    commands = [
        ["evaluate", str(out), str(data), "--split", "test"],
        ["predict", str(out), str(data / "test"), "--output", str(tmp_path / "p.csv")],
        ["report", str(out), "--gradcam", "0", "--top-k", "2"],
        ["verify", str(out), str(data)],
        ["runs", str(tmp_path)],
    ]
    for cmd in commands:
        result = runner.invoke(app, cmd, env=env)
        assert result.exit_code == 0, (cmd, result.output)
    transferlab.fit(data, out=tmp_path / "run2", **tiny_fit_options(tmp_path))
    assert _tree_digest(data) == before
