"""Exported ONNX model on ONNX Runtime vs the same full model in eager PyTorch, plus int8.

    .venv/bin/python benchmarks/export_speed.py RUN [--data DIR] [--batch 32] [--threads 2]

The model measured is the whole exported function (uint8 RGB NCHW → normalize → body → head →
softmax), identical in both engines, on the same batch of real test images, both in this run
with the same thread count. Timings are interleaved (eager, fp32, int8, eager, ...) so a noisy
shared machine penalises every engine alike; the median per-batch time is reported.
Then int8 (static QDQ, per-channel, calibrated on the val split): test accuracy change and
speed-up vs fp32 ONNX Runtime. Targets: ORT ≥ 1.5× eager.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder written by `transferlab fit`")
    ap.add_argument("--data", type=Path, default=None, help="dataset (default: the run's own)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()

    import transferlab
    from transferlab.export import ImageSource, export_model
    from transferlab.export.module import exported_module
    from transferlab.export.onnx import ort_session

    torch.set_num_threads(args.threads)
    clf = transferlab.load(args.run)
    images = ImageSource(clf, args.run, args.data)
    pool = images.split("test", "val", "train")
    if not pool:
        raise SystemExit("no images on disk for this run: pass --data DIR")
    x, _ = images.decode(pool[:: max(1, len(pool) // args.batch)][: args.batch])
    x = np.resize(x, (args.batch, *x.shape[1:]))
    print(f"model: {clf.saved.body['spec']} + {clf.saved.head['kind']} head, classes {clf.classes}")
    print(f"batch {args.batch} of real images (uint8 {tuple(x.shape)}), {args.threads} threads\n")

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        rep = export_model(args.run, "onnx", fp32_path, threads=args.threads)
        p = rep["parity"]
        print(
            f"ONNX export {rep['export_s']:.1f}s, parity vs eager on {p['n']} images: "
            f"top-1 {p['top1_agree']}/{p['n']}, max |Δp| {p['max_abs_diff']:.1e}"
        )
        q = None
        if not args.no_int8:
            q_path = Path(tmp) / "model.int8.onnx"
            qrep = export_model(
                args.run, "onnx", q_path, quantize="int8", data=args.data, threads=args.threads
            )
            q = qrep["quantization"]

        eager = exported_module(clf)
        fp32 = ort_session(fp32_path, args.threads, spin=False)
        engines = {
            "eager PyTorch": lambda: _eager(eager, x),
            "ONNX Runtime fp32": lambda: fp32.run(None, {"images": x}),
        }
        if q is not None:
            int8 = ort_session(q_path, args.threads, spin=False)
            engines["ONNX Runtime int8"] = lambda: int8.run(None, {"images": x})
        times = _interleaved(engines, args.reps)

    print()
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        med = statistics.median(t)
        print(
            f"{name:18s} {rate[name]:7.1f} img/s  (median {med * 1e3:6.1f} ms/batch, "
            f"min {min(t) * 1e3:6.1f}, max {max(t) * 1e3:6.1f})"
        )
    best = {name: args.batch / min(t) for name, t in times.items()}
    ratio = rate["ONNX Runtime fp32"] / rate["eager PyTorch"]
    print(
        f"\n(best-of-{args.reps} ratios, less sensitive to other load on the machine: ORT/eager "
        f"{best['ONNX Runtime fp32'] / best['eager PyTorch']:.2f}x"
        + (
            f", int8/fp32 {best['ONNX Runtime int8'] / best['ONNX Runtime fp32']:.2f}x)"
            if "ONNX Runtime int8" in best
            else ")"
        )
    )
    print(
        f"\nORT fp32 / eager PyTorch: {ratio:.2f}x "
        f"(target >= 1.5x: {'OK' if ratio >= 1.5 else 'MISSED'})"
    )
    if q is not None:
        speedup = rate["ONNX Runtime int8"] / rate["ONNX Runtime fp32"]
        print(
            f"int8 / fp32 ONNX Runtime: {speedup:.2f}x; "
            f"size {q['fp32_bytes'] / 1e6:.1f} → {q['int8_bytes'] / 1e6:.1f} MB"
        )
        acc = q.get("accuracy")
        if acc:
            print(
                f"int8 test accuracy: {acc['fp32']:.4f} → {acc['int8']:.4f} "
                f"(change {acc['change']:+.4f}, n={acc['n']}, top-1 agreement "
                f"{acc['top1_agreement']:.4f}, calibrated on {q['calibration_images']} images)"
            )


def _eager(model: torch.nn.Module, x: np.ndarray) -> None:
    with torch.inference_mode():
        model(torch.from_numpy(x))


def _interleaved(engines: dict, reps: int) -> dict[str, list[float]]:
    for run in engines.values():  # warm-up: first-call allocations and kernel selection
        run()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, run in engines.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return times


if __name__ == "__main__":
    main()
