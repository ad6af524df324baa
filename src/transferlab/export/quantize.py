"""int8 ONNX: static QDQ quantization calibrated on real images (dynamic without any), then its
accuracy change on the test split and its speed-up over fp32, measured on ONNX Runtime."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.export.images import ImageSource
from transferlab.export.metadata import INPUT_NAME
from transferlab.export.onnx import ort_session, run_batched, set_onnx_metadata, time_session

__all__ = ["quantize_int8"]

Log = Callable[[str], None]


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over uint8 batches."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch] for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._batches, None)
        return None if b is None else {INPUT_NAME: b}


def quantize_int8(
    fp32: Path,
    out: Path,
    meta: dict[str, Any],
    images: ImageSource,
    calibration_images: int,
    threads: int,
    say: Log,
) -> dict[str, Any]:
    """Write the int8 version of ``fp32`` to ``out``; how it was made, its accuracy and speed."""
    import onnx

    t0 = time.perf_counter()
    prepared = _pre_process(fp32)
    calib = images.calibration(calibration_images)
    info: dict[str, Any] = {"dtype": "int8", "data": images.origin}
    if len(calib):
        say(f"calibrating on {len(calib)} images ...")
        info.update(_quantize_static(prepared, out, calib))
    else:
        say("no images on disk to calibrate with: dynamic quantization (pass data= for static)")
        info.update(_quantize_dynamic(prepared, out))
    proto = onnx.load(str(out))
    set_onnx_metadata(proto, {**meta, "quantization": dict(info)})
    onnx.save(proto, str(out))
    info["quantize_s"] = time.perf_counter() - t0

    fp_sess, q_sess = ort_session(fp32, threads), ort_session(out, threads)
    info["accuracy"], bench = _accuracy(fp_sess, q_sess, images, say)
    info["speed"] = _speed(fp_sess, q_sess, bench, threads)
    info["fp32_bytes"] = fp32.stat().st_size
    info["int8_bytes"] = out.stat().st_size
    return info


def _pre_process(fp32: Path) -> Path:
    """Shape inference + graph optimisation, as onnxruntime recommends before static QDQ."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32.with_name("model.prep.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    except Exception:
        return fp32
    return prepared


def _quantize_static(prepared: Path, out: Path, calib: np.ndarray) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # Keep the uint8 → float normalisation and the softmax in float: quantizing them only adds
    # error (the input is already 8-bit) and the softmax output must stay a probability.
    graph = onnx.load(str(prepared), load_external_data=False).graph
    keep_float = [n.name for n in graph.node if n.op_type in ("Softmax", "Cast")]
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
    return {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8 (MinMax)",
        "weights": "int8",
        "calibration_images": int(len(calib)),
    }


def _quantize_dynamic(prepared: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
    return {
        "method": "dynamic",
        "per_channel": True,
        "weights": "int8 (MatMul/Gemm only; convolutions stay fp32)",
        "calibration_images": 0,
        "note": "without calibration images only matrix products are quantized; pass data= "
        "(--data) for static int8 of the whole network",
    }


def _accuracy(
    fp_sess: Any, q_sess: Any, images: ImageSource, say: Log
) -> tuple[dict[str, Any] | None, np.ndarray]:
    """fp32 vs int8 on the test split (None without one), and the images to time them on."""
    test = images.split("test")
    if not test:
        return None, images.parity_batch()  # no test split on disk: pass data=... to measure it
    say(f"measuring accuracy on {len(test)} test images ...")
    x, y = images.decode(test)
    p_fp = run_batched(fp_sess, x)
    p_q = run_batched(q_sess, x)
    acc_fp = float((p_fp.argmax(1) == y).mean())
    acc_q = float((p_q.argmax(1) == y).mean())
    accuracy = {
        "n": int(len(y)),
        "fp32": acc_fp,
        "int8": acc_q,
        "change": acc_q - acc_fp,
        "top1_agreement": float((p_fp.argmax(1) == p_q.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.max(np.abs(p_fp - p_q))),
    }
    return accuracy, x


def _speed(fp_sess: Any, q_sess: Any, bench: np.ndarray, threads: int) -> dict[str, Any]:
    batch = np.resize(bench, (32, *bench.shape[1:])) if len(bench) else bench
    fp_s, q_s = time_session(fp_sess, batch), time_session(q_sess, batch)
    return {
        "batch": int(len(batch)),
        "threads": threads,
        "fp32_images_per_s": len(batch) / fp_s,
        "int8_images_per_s": len(batch) / q_s,
        "speedup": fp_s / q_s,
    }


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs a multi-line root WARNING for every integer shape tensor
    (timm's 'same' padding arithmetic) it rightly leaves alone; keep the CLI readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
