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
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from transferlab.errors import ImageError, TransferlabError
from transferlab.runtime import Uint8Input
from transferlab.system import available_cpus

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "EXPORT_FORMATS",
    "ExportedModel",
    "export_model",
    "read_metadata",
]

EXPORT_FORMATS = ("onnx", "torchscript")
OPSET = 17
PARITY_ATOL = 1e-4
METADATA_KEY = "transferlab"
TORCHSCRIPT_EXTRA = "transferlab.json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
_EXPORT_BATCH = 2  # the trace's dummy batch; the parity batch has another size (dynamic axis)
_NOISE_IMAGES = 3

Log = Callable[[str], None]


class ExportedModel(Uint8Input):
    """uint8 RGB (n, 3, H, W) → class probabilities (n, C): what the exported file computes."""

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        temperature: float = 1.0,
    ) -> None:
        super().__init__(net, mean, std)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        if self.temperature != 1.0:  # a constant in the graph; skipped when it changes nothing
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


# --------------------------------------------------------------------------------------------
# public entry point


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
    say: Log = log or (lambda _m: None)
    if fmt not in EXPORT_FORMATS:
        raise TransferlabError(f"--format {fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
    if quantize not in (None, "int8"):
        raise TransferlabError(f"--quantize {quantize!r}: only 'int8' is supported")
    if quantize and fmt != "onnx":
        raise TransferlabError("--quantize int8 needs --format onnx")
    clf, run_dir = _classifier(run_or_classifier)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_threads = threads or available_cpus()
    images = _ImageSource(clf, run_dir, data)
    model = _exported_module(clf)
    meta = build_metadata(clf, fmt)

    parity_images = images.parity_batch()
    with torch.inference_mode():
        reference = model(torch.from_numpy(parity_images)).numpy()

    report: dict[str, Any] = {
        "format": fmt,
        "path": str(out),
        "classes": list(clf.classes),
        "input": meta["input"],
        "output": meta["output"],
        "preprocess": meta["preprocess"],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".tl-export-", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        if fmt == "onnx":
            fp32 = tmp / "model.onnx"
            _export_onnx(model, clf, fp32, meta)
            report["export_s"] = time.perf_counter() - t0
            say(f"exported ONNX in {report['export_s']:.1f}s")
            got = _ort_session(fp32, n_threads).run(None, {INPUT_NAME: parity_images})[0]
            report["parity"] = _parity(reference, got, "onnxruntime")
            final = fp32
            if quantize:
                say("quantizing to int8 ...")
                qpath = tmp / "model.int8.onnx"
                report["quantization"] = _quantize_int8(
                    fp32, qpath, meta, images, calibration_images, n_threads, say
                )
                final = qpath
        else:
            final = tmp / "model.pt"
            _export_torchscript(model, clf, final, meta)
            report["export_s"] = time.perf_counter() - t0
            say(f"exported TorchScript in {report['export_s']:.1f}s")
            loaded = _jit_load(final)
            with torch.inference_mode():
                got = loaded(torch.from_numpy(parity_images)).numpy()
            report["parity"] = _parity(reference, got, "torchscript")
        if not report["parity"]["ok"]:
            p = report["parity"]
            raise TransferlabError(
                f"the {fmt} export disagrees with PyTorch (max |Δp| {p['max_abs_diff']:.2e}, "
                f"top-1 agreement {p['top1_agree']}/{p['n']}); nothing was written to {out}"
            )
        os.replace(final, out)
    report["bytes"] = out.stat().st_size
    return report


# --------------------------------------------------------------------------------------------
# metadata


def build_metadata(clf: Classifier, fmt: str) -> dict[str, Any]:
    """Everything a consumer needs to feed the file and read its output, JSON-able."""
    import transferlab

    saved = clf.saved
    pre = saved.preprocess
    h, w = pre.input_size
    rh, rw = pre.resize_size
    test = (clf.metrics or {}).get("test") or {}
    return {
        "format": f"transferlab-{fmt}",
        "format_version": 1,
        "classes": list(saved.classes),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": "RGB",
            "shape": ["batch", 3, h, w],
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(saved.classes)],
            "kind": "probabilities (softmax over classes)",
            "temperature": float(saved.temperature),
        },
        "preprocess": {
            **pre.to_dict(),
            "resize_size": [rh, rw],
            "in_graph": "uint8 → float, (x/255 − mean)/std, softmax",
            "outside_graph": (
                "decode to RGB (EXIF orientation applied, alpha over white); "
                + (
                    f"resize to {rw}×{rh} ({pre.interpolation})"
                    if pre.crop_mode == "squash"
                    else f"resize the shorter side to {min(rh, rw)} ({pre.interpolation}, "
                    "aspect kept)"
                )
                + f"; centre-crop {w}×{h}; HWC → CHW; batch"
            ),
        },
        "backbone": saved.body.get("spec"),
        "strategy": saved.strategy,
        "metrics": {
            k: test[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "n") if k in test
        },
        "transferlab_version": transferlab.__version__,
        "torch_version": torch.__version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The transferlab metadata of an exported ONNX or TorchScript file (plain JSON)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise TransferlabError(f"{path}: no transferlab metadata in this ONNX file")
        return json.loads(props[METADATA_KEY])
    extra = {TORCHSCRIPT_EXTRA: ""}
    _jit_load(path, extra)
    if not extra[TORCHSCRIPT_EXTRA]:
        raise TransferlabError(f"{path}: no transferlab metadata in this TorchScript file")
    return json.loads(extra[TORCHSCRIPT_EXTRA])


# --------------------------------------------------------------------------------------------
# exporters


def _exported_module(clf: Classifier) -> ExportedModel:
    saved = clf.saved
    net = copy.deepcopy(saved.net).float().eval()  # the caller's model is left untouched
    pre = saved.preprocess
    return ExportedModel(net, pre.mean, pre.std, saved.temperature).eval()


def _dummy(clf: Classifier, n: int = _EXPORT_BATCH) -> torch.Tensor:
    h, w = clf.saved.preprocess.input_size
    return torch.zeros((n, 3, h, w), dtype=torch.uint8)


def _export_onnx(model: ExportedModel, clf: Classifier, path: Path, meta: dict[str, Any]) -> None:
    import onnx

    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about shape-dependent Python ints (timm's 'same' padding) are
        # expected: the spatial size is fixed by the preprocessing, only the batch is dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (_dummy(clf),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    _set_onnx_metadata(proto, meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    import onnx

    proto.producer_name = "transferlab"
    proto.doc_string = (
        "uint8 RGB NCHW images at the model's input size → class probabilities; "
        "see metadata_props['transferlab']"
    )
    onnx.helper.set_model_props(
        proto,
        {
            METADATA_KEY: json.dumps(meta, ensure_ascii=False),
            "classes": json.dumps(meta["classes"], ensure_ascii=False),
            "preprocess": json.dumps(meta["preprocess"], ensure_ascii=False),
            "input_layout": "NCHW uint8 RGB",
        },
    )


def _export_torchscript(
    model: ExportedModel, clf: Classifier, path: Path, meta: dict[str, Any]
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # same tracer warnings as for ONNX
        traced = torch.jit.trace(model, (_dummy(clf),), check_trace=False)
        with contextlib.suppress(Exception):
            # Folds BatchNorm and constants; purely an optimisation, parity is checked anyway.
            traced = torch.jit.freeze(traced)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # "use torch.export": TorchScript is asked for
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def _jit_load(path: Path, extra: dict[str, Any] | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra or {})


def _parity(reference: np.ndarray, got: np.ndarray, engine: str) -> dict[str, Any]:
    diff = float(np.max(np.abs(reference.astype(np.float64) - got))) if reference.size else 0.0
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    agree = int((ref_top == got_top).sum())
    # A disagreement is only excusable where PyTorch itself has a tie within the tolerance.
    srt = np.sort(reference, axis=1)
    margin = srt[:, -1] - srt[:, -2] if reference.shape[1] > 1 else np.ones(len(reference))
    real = int(((ref_top != got_top) & (margin > 2 * PARITY_ATOL)).sum())
    return {
        "engine": engine,
        "reference": "eager PyTorch",
        "n": int(len(reference)),
        "max_abs_diff": diff,
        "top1_agree": agree,
        "ok": bool(diff <= PARITY_ATOL and real == 0),
    }


# --------------------------------------------------------------------------------------------
# images for parity, calibration and accuracy


class _ImageSource:
    """Real images of the run's dataset (or ``data``), decoded with the model's preprocessing."""

    def __init__(self, clf: Classifier, run_dir: Path | None, data: Any) -> None:
        from transferlab.evaluation.analysis import prepare_run_data, read_json

        self.clf = clf
        self.samples: dict[str, list[tuple[str, int]]] = {}
        self.origin = "none"
        index = None
        if data is not None:
            # The run's splits on that folder, scanned as fit scans it: unusable files are
            # reported and skipped, never fed to calibration or the accuracy check.
            prepared = prepare_run_data(data, clf.saved.config, clf.classes)
            for name, split in prepared.splits.items():
                self.samples[name] = [
                    (p, int(y)) for p, y in zip(split.paths, split.labels, strict=True)
                ]
            self.origin = str(data)
        else:
            summary = clf.data_summary or (read_json(run_dir / "data.json") if run_dir else None)
            if summary and "index" in summary:
                from transferlab.data.discover import DatasetIndex

                with contextlib.suppress(Exception):  # an old/foreign data.json: no images
                    index = DatasetIndex.from_dict(summary["index"])
                    self.origin = f"the run's dataset ({index.root})"
        if index is not None:
            classes = list(clf.classes)
            for s in index.samples:
                if s.label in classes and os.path.isfile(s.path):
                    self.samples.setdefault(s.split, []).append((s.path, classes.index(s.label)))

    def split(self, *names: str) -> list[tuple[str, int]]:
        for name in names:
            if self.samples.get(name):
                return self.samples[name]
        return []

    def decode(self, items: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        from transferlab.data.images import load_image

        pre = self.clf.saved.preprocess
        arrays, labels = [], []
        for path, label in items:
            try:
                arrays.append(load_image(path, pre))
            except ImageError:
                continue  # skipped at fit time too
            labels.append(label)
        h, w = pre.input_size
        if not arrays:
            return np.zeros((0, 3, h, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        return np.stack(arrays), np.asarray(labels, dtype=np.int64)

    def parity_batch(self, n_real: int = 8) -> np.ndarray:
        """Real images (every class, when on disk) plus noise: an odd batch size on purpose."""
        pool = self.split("test", "val", "train")
        step = max(1, len(pool) // n_real)
        real, _ = self.decode(pool[::step][:n_real])
        h, w = self.clf.saved.preprocess.input_size
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, size=(_NOISE_IMAGES, 3, h, w), dtype=np.uint8)
        return np.concatenate([real, noise])

    def calibration(self, n: int) -> np.ndarray:
        pool = self.split("val", "train")
        step = max(1, len(pool) // max(1, n))
        images, _ = self.decode(pool[::step][:n])
        return images


# --------------------------------------------------------------------------------------------
# int8


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over uint8 batches."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch] for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._batches, None)
        return None if b is None else {INPUT_NAME: b}


def _quantize_int8(
    fp32: Path,
    out: Path,
    meta: dict[str, Any],
    images: _ImageSource,
    calibration_images: int,
    threads: int,
    say: Log,
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    prepared = fp32.with_name("model.prep.onnx")
    try:
        # Shape inference + graph optimisation first, as onnxruntime recommends for static QDQ.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    except Exception:
        prepared = fp32
    calib = images.calibration(calibration_images)
    info: dict[str, Any] = {"dtype": "int8", "data": images.origin}
    # Keep the uint8 → float normalisation and the softmax in float: quantizing them only adds
    # error (the input is already 8-bit) and the softmax output must stay a probability.
    graph = onnx.load(str(prepared), load_external_data=False).graph
    keep_float = [n.name for n in graph.node if n.op_type in ("Softmax", "Cast")]
    if len(calib):
        say(f"calibrating on {len(calib)} images ...")
        with _quiet_root_logger():
            quantize_static(
                str(prepared),
                str(out),
                _Calibration(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
            )
        info.update(
            method="static",
            format="QDQ",
            per_channel=True,
            activations="uint8 (MinMax)",
            weights="int8",
            calibration_images=int(len(calib)),
        )
    else:
        say("no images on disk to calibrate with: dynamic quantization (pass data= for static)")
        # Convolutions are left in float: ONNX Runtime's dynamic ConvInteger path is several
        # times slower than fp32 on CPU, so only the matrix products are quantized.
        with _quiet_root_logger():
            quantize_dynamic(
                str(prepared),
                str(out),
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "Attention", "LSTM", "Gather"],
            )
        info.update(
            method="dynamic",
            per_channel=True,
            weights="int8 (MatMul/Gemm only; convolutions stay fp32)",
            calibration_images=0,
            note="without calibration images only matrix products are quantized; pass data= "
            "(--data) for static int8 of the whole network",
        )
    proto = onnx.load(str(out))
    _set_onnx_metadata(proto, {**meta, "quantization": dict(info)})
    onnx.save(proto, str(out))
    info["quantize_s"] = time.perf_counter() - t0

    fp_sess, q_sess = _ort_session(fp32, threads), _ort_session(out, threads)
    test = images.split("test")
    if test:
        say(f"measuring accuracy on {len(test)} test images ...")
        x, y = images.decode(test)
        p_fp = _run_batched(fp_sess, x)
        p_q = _run_batched(q_sess, x)
        acc_fp = float((p_fp.argmax(1) == y).mean())
        acc_q = float((p_q.argmax(1) == y).mean())
        info["accuracy"] = {
            "n": int(len(y)),
            "fp32": acc_fp,
            "int8": acc_q,
            "change": acc_q - acc_fp,
            "top1_agreement": float((p_fp.argmax(1) == p_q.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.max(np.abs(p_fp - p_q))),
        }
        bench = x
    else:
        info["accuracy"] = None  # no test split on disk: pass data=... to measure it
        bench = images.parity_batch()
    batch = np.resize(bench, (32, *bench.shape[1:])) if len(bench) else bench
    fp_s, q_s = _time_session(fp_sess, batch), _time_session(q_sess, batch)
    info["speed"] = {
        "batch": int(len(batch)),
        "threads": threads,
        "fp32_images_per_s": len(batch) / fp_s,
        "int8_images_per_s": len(batch) / q_s,
        "speedup": fp_s / q_s,
    }
    info["fp32_bytes"] = fp32.stat().st_size
    info["int8_bytes"] = out.stat().st_size
    return info


# --------------------------------------------------------------------------------------------
# onnxruntime helpers


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs a multi-line root WARNING for every integer shape tensor
    (timm's 'same' padding arithmetic) it rightly leaves alone; keep the CLI readable."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort_session(path: Path, threads: int, *, spin: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        # Idle pool threads otherwise busy-wait after each run, stealing CPU from whatever runs
        # next (another engine in an interleaved benchmark).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run_batched(session: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    outs = [
        session.run(None, {INPUT_NAME: images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs)


def _time_session(session: Any, batch: np.ndarray, reps: int = 5) -> float:
    """Median seconds per batch after one warm-up call."""
    session.run(None, {INPUT_NAME: batch})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _classifier(run: Any) -> tuple[Classifier, Path | None]:
    from transferlab.api import Classifier, load

    if isinstance(run, Classifier):
        return run, None
    return load(run), Path(run)
