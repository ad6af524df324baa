"""Memory and time of the head fit: a 200k x 1280 memmap vs the small-data L-BFGS path, and the
fit's thread count with and without a competing CPU-bound process.

    .venv/bin/python benchmarks/head_memory.py [--rows 200000] [--small 5000] [--threads]

Synthetic features (Gaussian class blobs with an offset and uneven scales, like pooled CNN
features; classes overlap, so accuracy is informative) are written chunk by chunk to an .npy
memmap in a temp folder. Each fit runs in a fresh subprocess that opens the matrix read-only
and prints its own peak RSS (``VmHWM``, and ``ru_maxrss``, which Linux carries over from the
forking parent across exec, so it can only be larger; both include the memmap pages it touched,
page cache the kernel can reclaim), its anonymous RSS at the end, the fit time and held-out
accuracy. ``--rows 0`` skips the large fit. ``--threads``: the small fit with ``num_threads``
1 vs None (torch's default), idle and next to ``python -c "while True: pass"``, alternated
``--reps`` times in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D, CLASSES = 1280, 10


def make(path: Path, n: int, seed: int) -> np.ndarray:
    """Write ``n`` rows to ``path`` (.npy) a chunk at a time; return the labels."""
    # centres ~4.5 noise-sigmas apart: classes overlap a little
    centres = np.random.default_rng(0).standard_normal((CLASSES, D)) * (4.5 / np.sqrt(2 * D))
    scale = np.linspace(0.5, 3.0, D)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    for start in range(0, n, 8192):
        rows = slice(start, min(n, start + 8192))
        noise = rng.standard_normal((rows.stop - start, D))
        x[rows] = ((centres[y[rows]] + noise) * scale + 1.0).astype(np.float32)
    x.flush()
    return y


def child(args: argparse.Namespace) -> None:
    import torch

    from transferlab.heads import fit_head

    folder = Path(args.folder)
    x = np.load(folder / f"{args.train}.npy", mmap_mode="r")
    y = np.load(folder / f"{args.train}.y.npy")
    xv, yv = np.load(folder / "val.npy", mmap_mode="r"), np.load(folder / "val.y.npy")
    xt, yt = np.load(folder / "test.npy", mmap_mode="r"), np.load(folder / "test.y.npy")
    threads = None if args.num_threads == "none" else int(args.num_threads)
    t0 = time.perf_counter()
    head = fit_head("linear", x, y, xv, yv, num_classes=CLASSES, num_threads=threads)
    seconds = time.perf_counter() - t0
    acc = float((head.predict_logits(xt).argmax(1) == yt).mean())
    with open("/proc/self/status") as f:
        status = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
    print(json.dumps({
        "rows": len(x), "solver": head.spec["solver"], "l2": head.spec["l2"],
        "seconds": round(seconds, 2), "test_acc": round(acc, 4),
        "peak_rss_mb": int(status["VmHWM"][0]) // 1024,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "anon_rss_end_mb": int(status["RssAnon"][0]) // 1024,
        "torch_threads_default": torch.get_num_threads(),
    }))  # fmt: skip


def fit_in_child(folder: Path, train: str, num_threads: str = "1") -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--train", train,
           "--num-threads", num_threads]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def threads(folder: Path, reps: int) -> None:
    print("\nsmall fit, num_threads 1 vs None (torch default), seconds (measure ratios):")
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            times: dict[str, list[float]] = {"1": [], "none": []}
            for _ in range(reps):
                for n in ("1", "none"):
                    times[n].append(fit_in_child(folder, "small", n)["seconds"])
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        med = {k: float(np.median(v)) for k, v in times.items()}
        label = "with a busy process" if busy else "no competing process"
        print(f"  {label}: 1 thread {med['1']:.2f} s, default {med['none']:.2f} s "
              f"(default / 1 = {med['none'] / med['1']:.2f}x); runs {times}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--threads", action="store_true", help="also time 1 thread vs default")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--num-threads", default="1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        sets = [("large", args.rows, 1)] if args.rows else []
        for name, n, seed in [*sets, ("small", args.small, 2), ("val", 5000, 3), ("test", 5000, 4)]:
            np.save(folder / f"{name}.y.npy", make(folder / f"{name}.npy", n, seed))
        print(f"data: {args.rows} + {args.small} train rows x {D} float32, 5000 val, 5000 test "
              f"({time.perf_counter() - t0:.0f} s to write)")  # fmt: skip
        for train in ("small", "large") if args.rows else ("small",):
            print(f"{train}: {json.dumps(fit_in_child(folder, train))}")
        if args.threads:
            threads(folder, args.reps)


if __name__ == "__main__":
    main()
