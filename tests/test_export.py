"""Exports: ONNX / TorchScript parity with eager PyTorch, self-describing metadata, int8."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import transferlab
from test_predict import make_dataset, make_run
from transferlab.errors import TransferlabError
from transferlab.export import export_model, read_metadata
from transferlab.predict import PredictionEngine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("export") / "data")


@pytest.fixture(scope="module")
def run_dir(data):
    return make_run(data.parent / "run", data)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _consumer_preprocess(path, meta):
    """What a consumer does with only Pillow + the file's metadata (no transferlab)."""
    pp = meta["preprocess"]
    h, w = pp["input_size"]
    short = min(pp["resize_size"])
    img = Image.open(path).convert("RGB")
    scale = short / min(img.size)
    img = img.resize(
        (max(short, int(img.width * scale)), max(short, int(img.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = round((img.width - w) / 2), round((img.height - h) / 2)
    img = img.crop((left, top, left + w, top + h))
    return np.asarray(img).transpose(2, 0, 1)


def test_onnx_export_matches_pytorch_and_describes_itself(run_dir, data, tmp_path):
    out = tmp_path / "model.onnx"
    report = export_model(run_dir, "onnx", out, threads=1)
    parity = report["parity"]
    assert parity["ok"] and parity["top1_agree"] == parity["n"] >= 4
    assert parity["max_abs_diff"] <= 1e-4
    assert report["input"]["dtype"] == "uint8" and report["input"]["layout"] == "NCHW"

    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["transferlab"])
    assert json.loads(props["classes"]) == meta["classes"] == ["blue", "red"]
    assert json.loads(props["preprocess"])["mean"] == list(meta["preprocess"]["mean"])
    assert meta["input"]["shape"] == ["batch", 3, 64, 64]
    assert meta["preprocess"]["resize_size"] == [73, 73]  # floor(64 / 0.875)
    assert read_metadata(out) == meta

    # Dynamic batch, uint8 in, probabilities out, identical to the engine on the same pixels.
    clf = transferlab.load(run_dir)
    engine = PredictionEngine(clf, workers=0)
    files = sorted((data / "test").rglob("*.jpg"))[:5]
    x = np.stack([engine.decode(f.read_bytes()) for f in files])
    sess = _session(out)
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    (probs,) = sess.run(None, {"images": x})
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, engine.infer(x), atol=1e-4)
    # A consumer with only Pillow and the metadata gets the same labels.
    xc = np.stack([_consumer_preprocess(f, meta) for f in files])
    (pc,) = sess.run(None, {"images": xc})
    assert (pc.argmax(1) == probs.argmax(1)).all()


def test_torchscript_export_matches_pytorch(run_dir, tmp_path):
    out = tmp_path / "model.pt"
    report = export_model(run_dir, "torchscript", out)
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-4
    extra = {"transferlab.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["transferlab.json"])
    assert meta["classes"] == ["blue", "red"] and meta["input"]["dtype"] == "uint8"
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)  # another batch size
    with torch.inference_mode():
        probs = module(x)
    assert probs.shape == (5, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(5), atol=1e-5, rtol=0)


def test_temperature_is_baked_into_the_graph(run_dir, tmp_path):
    clf = transferlab.load(run_dir)
    engine = PredictionEngine(clf, workers=0)
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    plain = engine.infer(x)
    clf.saved.temperature = 3.0
    report = export_model(clf, "onnx", tmp_path / "t.onnx")
    assert report["output"]["temperature"] == 3.0
    (probs,) = _session(tmp_path / "t.onnx").run(None, {"images": x})
    np.testing.assert_allclose(probs, engine.infer(x), atol=1e-4)  # the engine applies it too
    assert np.abs(probs - 0.5).max() < np.abs(plain - 0.5).max()  # softer than T=1


@pytest.mark.slow
def test_int8_static_quantization_reports_accuracy_and_speed(run_dir, data, tmp_path):
    out = tmp_path / "model.int8.onnx"
    report = export_model(run_dir, "onnx", out, quantize="int8", data=data, threads=1)
    q = report["quantization"]
    assert q["method"] == "static" and q["format"] == "QDQ" and q["per_channel"]
    assert q["calibration_images"] == 6  # the val split
    acc = q["accuracy"]
    assert acc["n"] == 6 and acc["change"] == pytest.approx(acc["int8"] - acc["fp32"])
    assert q["speed"]["speedup"] > 0 and q["int8_bytes"] < q["fp32_bytes"]
    meta = read_metadata(out)
    assert meta["quantization"]["method"] == "static"
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops
    (probs,) = _session(out).run(None, {"images": np.zeros((2, 3, 64, 64), np.uint8)})
    assert probs.shape == (2, 2)


@pytest.mark.slow
def test_int8_without_images_falls_back_to_dynamic(run_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "data.json").unlink()  # no record of the dataset: nothing to calibrate with
    report = export_model(bare, "onnx", tmp_path / "d.onnx", quantize="int8", threads=1)
    q = report["quantization"]
    assert q["method"] == "dynamic" and q["calibration_images"] == 0
    assert q["accuracy"] is None and q["speed"]["speedup"] > 0


def test_bad_requests_are_user_errors(run_dir, tmp_path):
    with pytest.raises(TransferlabError, match="--format"):
        export_model(run_dir, "tflite", tmp_path / "m")
    with pytest.raises(TransferlabError, match="--quantize"):
        export_model(run_dir, "onnx", tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(TransferlabError, match="onnx"):
        export_model(run_dir, "torchscript", tmp_path / "m.pt", quantize="int8")
    # a name that predict/evaluate/serve would read as the other format
    with pytest.raises(TransferlabError, match="torchscript needs another name, e.g. model.pt"):
        export_model(run_dir, "torchscript", tmp_path / "m.onnx")
    with pytest.raises(TransferlabError, match="onnx needs a name ending in .onnx"):
        export_model(run_dir, "onnx", tmp_path / "m.pt")
    assert not list(tmp_path.glob("m.*"))


def test_cli_export_prints_parity_and_writes_report(run_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from transferlab.cli_ship import register

    app = typer.Typer()
    register(app)
    out, report = tmp_path / "cli.onnx", tmp_path / "report.json"
    r = CliRunner().invoke(
        app, ["export", str(run_dir), "--out", str(out), "--json", str(report), "--threads", "1"]
    )
    assert r.exit_code == 0, r.output
    assert "parity vs eager PyTorch" in r.output and "uint8 RGB" in r.output
    assert json.loads(report.read_text())["parity"]["ok"] is True
    assert read_metadata(out)["classes"] == ["blue", "red"]


def test_predict_and_evaluate_take_the_exported_file(run_dir, data, tmp_path):
    """An exported .onnx stands in for its run folder: the same labels per image and the same
    evaluation (labels and preprocessing read from the file), as the CLI's user runs them."""
    import subprocess
    import sys

    out = tmp_path / "m.onnx"
    export_model(run_dir, "onnx", out, threads=1)

    def tl(*args):
        cmd = [sys.executable, "-m", "transferlab", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    rows = {}
    for model in (run_dir, out):
        r = tl("predict", model, data / "test", "--format", "jsonl")
        assert r.returncode == 0, r.stderr
        rows[model] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(r["path"], r["label"]) for r in rows[out]] == [
        (r["path"], r["label"]) for r in rows[run_dir]
    ]
    for a, b in zip(rows[out], rows[run_dir], strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-4

    reports = {}
    for model in (run_dir, out):
        r = tl("evaluate", model, data, "--json", tmp_path / "e.json")
        assert r.returncode == 0, r.stderr
        reports[model] = json.loads((tmp_path / "e.json").read_text())
    assert reports[out]["accuracy"] == reports[run_dir]["accuracy"]
    assert reports[out]["confusion_matrix"] == reports[run_dir]["confusion_matrix"]
    # what the exported file cannot do is said, not attempted
    r = tl("evaluate", out, data, "--calibrate")
    assert r.returncode == 2 and "run folder" in r.stderr
    (tmp_path / "plain.onnx").write_bytes(b"not onnx")
    r = tl("predict", tmp_path / "plain.onnx", data / "test")
    assert r.returncode == 2 and "not a loadable ONNX model" in r.stderr
