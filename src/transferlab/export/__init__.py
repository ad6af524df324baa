"""Export a trained model as one self-contained file: ONNX or TorchScript.

The exported graph is the whole classifier, preprocessing and calibration included:

    images: uint8 (n, 3, H, W), RGB, NCHW, H×W = the model's input size (see below)
      → float → (x/255 − mean)/std → body → head → logits / temperature → softmax
    probabilities: float32 (n, C), rows sum to 1, columns in the order of ``classes``

Only the geometric step stays outside the graph, because it needs the original picture: resize
the shorter side to ``resize_size`` (= floor(input_size / crop_pct)) with ``interpolation``, then
centre-crop ``input_size`` (``crop_mode`` "squash" resizes both sides instead). That contract,
the labels and the rest travel inside the file: ONNX ``metadata_props`` (key ``transferlab``,
plus ``classes`` and ``preprocess`` as their own keys), TorchScript ``_extra_files``
(``transferlab.json``). A consumer needs onnxruntime (or torch) and Pillow, nothing from
transferlab.

Every export is checked against eager PyTorch on a batch (real images from the run's data when
they are on disk, plus noise): top-1 identical and max |Δp| ≤ 1e-4, or the export is refused.
``quantize="int8"`` (ONNX) quantizes statically (QDQ, per-channel weights, calibrated on real
images of the run's val/train split) or, without images, dynamically; its accuracy change on the
test split and its speed-up over fp32 are measured and reported.

    metadata     what the file says about itself        module       the eager reference
    onnx         ONNX file + ONNX Runtime sessions      torchscript  TorchScript file
    images       real images for the checks             parity       the refusal
    quantize     int8, its accuracy and speed
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.api import Classifier, load
from transferlab.errors import TransferlabError
from transferlab.export.images import ImageSource
from transferlab.export.metadata import INPUT_NAME, build_metadata, read_metadata
from transferlab.export.module import ExportedModel, example_input, exported_module
from transferlab.export.onnx import export_onnx, ort_session
from transferlab.export.parity import parity, refuse_unless_parity
from transferlab.export.quantize import Log, quantize_int8
from transferlab.export.torchscript import export_torchscript, jit_load
from transferlab.system import available_cpus

__all__ = ["EXPORT_FORMATS", "ExportedModel", "ImageSource", "export_model", "read_metadata"]

EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class _Job:
    """One export: the model, its eager reference on the parity batch, where to say progress."""

    clf: Classifier
    model: ExportedModel
    meta: dict[str, Any]
    images: ImageSource
    threads: int
    say: Log
    parity_images: np.ndarray
    reference: np.ndarray


def export_model(
    run_or_classifier: str | os.PathLike[str] | Classifier,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    data: str | os.PathLike[str] | None = None,
    calibration_images: int = 128,
    threads: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Write ``run_or_classifier`` to ``out`` as ``fmt`` ("onnx" | "torchscript"); a report.

    ``quantize="int8"`` (ONNX only) writes the int8 model to ``out``. Images for calibration,
    parity and the int8 accuracy check come from ``data`` (its val/train split calibrates, its
    test split measures) or, without it, from the run's recorded dataset when still on disk.
    ``threads``: ONNX Runtime threads for the checks and timings (default: all usable CPUs).
    """
    out = Path(out)
    _check_request(fmt, quantize, out)
    clf, run_dir = _classifier(run_or_classifier)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = _prepare(clf, fmt, ImageSource(clf, run_dir, data), threads, log)
    report: dict[str, Any] = {
        "format": fmt,
        "path": str(out),
        "classes": list(clf.classes),
        "input": job.meta["input"],
        "output": job.meta["output"],
        "preprocess": job.meta["preprocess"],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".tl-export-", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        if fmt == "onnx":
            final = _write_onnx(job, tmp, report, t0, quantize, calibration_images)
        else:
            final = _write_torchscript(job, tmp, report, t0)
        refuse_unless_parity(report["parity"], fmt, out)
        os.replace(final, out)
    report["bytes"] = out.stat().st_size
    return report


def _check_request(fmt: str, quantize: str | None, out: Path) -> None:
    if fmt not in EXPORT_FORMATS:
        raise TransferlabError(f"--format {fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
    # predict, evaluate and serve tell an ONNX export from a run folder by its .onnx name
    if (out.suffix.lower() == ".onnx") != (fmt == "onnx"):
        right = "a name ending in .onnx" if fmt == "onnx" else "another name, e.g. model.pt"
        raise TransferlabError(
            f"--out {out}: --format {fmt} needs {right} (predict, evaluate and serve read any "
            ".onnx file as ONNX); nothing written"
        )
    if quantize not in (None, "int8"):
        raise TransferlabError(f"--quantize {quantize!r}: only 'int8' is supported")
    if quantize and fmt != "onnx":
        raise TransferlabError("--quantize int8 needs --format onnx")


def _prepare(
    clf: Classifier, fmt: str, images: ImageSource, threads: int | None, log: Log | None
) -> _Job:
    """The eager model and its probabilities on the parity batch, before anything is traced."""
    model = exported_module(clf)
    meta = build_metadata(clf, fmt)
    parity_images = images.parity_batch()
    with torch.inference_mode():
        reference = model(torch.from_numpy(parity_images)).numpy()
    say: Log = log or (lambda _m: None)
    return _Job(
        clf, model, meta, images, threads or available_cpus(), say, parity_images, reference
    )


def _write_onnx(
    job: _Job,
    tmp: Path,
    report: dict[str, Any],
    t0: float,
    quantize: str | None,
    calibration_images: int,
) -> Path:
    fp32 = tmp / "model.onnx"
    export_onnx(job.model, example_input(job.clf), fp32, job.meta)
    report["export_s"] = time.perf_counter() - t0
    job.say(f"exported ONNX in {report['export_s']:.1f}s")
    got = ort_session(fp32, job.threads).run(None, {INPUT_NAME: job.parity_images})[0]
    report["parity"] = parity(job.reference, got, "onnxruntime")
    if not quantize:
        return fp32
    job.say("quantizing to int8 ...")
    qpath = tmp / "model.int8.onnx"
    report["quantization"] = quantize_int8(
        fp32, qpath, job.meta, job.images, calibration_images, job.threads, job.say
    )
    return qpath


def _write_torchscript(job: _Job, tmp: Path, report: dict[str, Any], t0: float) -> Path:
    final = tmp / "model.pt"
    export_torchscript(job.model, example_input(job.clf), final, job.meta)
    report["export_s"] = time.perf_counter() - t0
    job.say(f"exported TorchScript in {report['export_s']:.1f}s")
    loaded = jit_load(final)
    with torch.inference_mode():
        got = loaded(torch.from_numpy(job.parity_images)).numpy()
    report["parity"] = parity(job.reference, got, "torchscript")
    return final


def _classifier(run: Any) -> tuple[Classifier, Path | None]:
    if isinstance(run, Classifier):
        return run, None
    return load(run), Path(run)
