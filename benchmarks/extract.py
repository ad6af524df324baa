"""End-to-end feature extraction speed: transferlab's pipeline vs two baselines, same run.

    .venv/bin/python benchmarks/extract.py [--data ../shared/datasets/cats_vs_dogs_small]

(a) naive: torchvision ImageFolder + Resize/CenterCrop/ToTensor/Normalize, DataLoader defaults,
    the same timm model in eager NCHW;
(b) eager PyTorch channels_last fed by transferlab's decode (same workers, same batches);
(c) transferlab: decode in threads ‖ the exported base on the fastest engine.
All three start from files on disk and end with a (n, D) feature matrix; the feature cache is
bypassed. Then the engine's limit: its model-only rate (images already decoded in memory) and
the end-to-end rate of ``FeatureExtractor`` (files → features in an empty cache), alternated
``--reps`` times in this run, and their ratio (the medians). All of these run at the backbone's
native input size (224 for MobileNetV2). Last, a cold `fit` (empty cache, export included) and a
warm re-fit are timed as a user runs them: at fit's default size (8/7 of native: 256).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def all_images(data: Path) -> list[str]:
    return sorted(str(p) for p in data.rglob("*.jpg"))


def naive(spec: str, data: Path) -> tuple[float, np.ndarray]:
    import timm
    from torchvision import datasets, transforms

    model = timm.create_model(spec, pretrained=True, num_classes=0).eval()
    cfg = timm.data.resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    tf = transforms.Compose(
        [
            transforms.Resize(int(size / cfg["crop_pct"])),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    splits = [datasets.ImageFolder(str(d), tf) for d in sorted(data.iterdir()) if d.is_dir()]
    ds = torch.utils.data.ConcatDataset(splits)
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=32):
            out.append(model(x))
    return time.perf_counter() - t0, torch.cat(out).numpy()


def eager_channels_last(spec: str, paths: list[str]) -> tuple[float, np.ndarray]:
    from transferlab.backbones import create_backbone
    from transferlab.data.loader import iter_decoded

    bb = create_backbone(spec)
    model = bb.model.to(memory_format=torch.channels_last)
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1) * 255
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for batch in iter_decoded(paths, bb.preprocess, batch_size=32):
            x = (torch.from_numpy(batch.images).float() - mean) / std
            out.append(model(x.contiguous(memory_format=torch.channels_last)))
    return time.perf_counter() - t0, torch.cat(out).numpy()


def transferlab_pipeline(spec: str, paths: list[str], export_dir: Path) -> tuple[float, float, str]:
    from transferlab.backbones import create_backbone
    from transferlab.data.loader import iter_decoded
    from transferlab.runtime import make_runtime

    bb = create_backbone(spec)
    t0 = time.perf_counter()
    runtime = make_runtime(bb, export_dir=export_dir)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for batch in iter_decoded(paths, bb.preprocess, batch_size=32):
        runtime(batch.images)
        n += len(batch.indices)
    return time.perf_counter() - t0, export_s, runtime.engine


def engine_limit(
    spec: str, paths: list[str], tmp: Path, reps: int
) -> tuple[dict[str, tuple[float, float]], str]:
    """{variant: (model-only img/s, end-to-end img/s)} (medians of ``reps`` alternated passes)
    and the engine. Variants: the runtime as built, and for OpenVINO also with its large
    batches on one stream (the latency compilation), to show what the streams bring.

    Model-only: the runtime on batches already decoded in memory, what the engine can do on
    this box (the faster of calling it per batch and its ``map``). End-to-end: FeatureExtractor
    from files into an empty cache namespace (decode threads ‖ engine, cache writes included),
    the same runtime object and batch size."""
    from transferlab.backbones import create_backbone
    from transferlab.cache import FeatureCache
    from transferlab.data.images import load_image
    from transferlab.extract import FeatureExtractor
    from transferlab.runtime import make_runtime

    bb = create_backbone(spec)
    cache = FeatureCache(tmp / "limit-cache")
    runtime = make_runtime(bb, export_dir=cache.exports_dir)
    decoded = np.stack([load_image(p, bb.preprocess) for p in paths])
    streams = getattr(runtime, "streams", 1)
    variants = {"as built": streams, "one stream": 1} if streams > 1 else {"as built": 1}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for rep in range(reps):
        for name, n_streams in variants.items():
            if streams > 1:
                runtime.streams = n_streams
            t0 = time.perf_counter()
            for i in range(0, len(decoded), 32):
                runtime(decoded[i : i + 32])
            t1 = time.perf_counter()
            for _ in runtime.map(decoded[i : i + 32] for i in range(0, len(decoded), 32)):
                pass
            # the engine's best of its two ways (one call per batch, which ends at a barrier /
            # batches pipelined through the streams, as FeatureExtractor feeds it)
            model = len(paths) / min(t1 - t0, time.perf_counter() - t1)
            ex = FeatureExtractor(bb, cache=cache, identity=f"bench-{name}-{rep}", runtime=runtime)
            got = ex(paths, [f"{i:064x}" for i in range(len(paths))])
            runs[name].append((model, got.stats["images_per_s"]))
    runtime.streams = streams
    medians = {
        name: (float(np.median([m for m, _ in r])), float(np.median([e for _, e in r])))
        for name, r in runs.items()
    }
    return medians, f"{runtime.engine}, {streams} stream(s)"


def timed_fit(data: Path, spec: str, cache: Path) -> tuple[float, float, float]:
    """Cold: `transferlab fit` as a user runs it (fresh process, empty cache, export included).
    Warm: the same fit again in this process, cache hit, imports already paid."""
    import transferlab

    run = cache.parent / "run"
    cmd = [sys.executable, "-m", "transferlab", "fit", str(data), "--backbone", spec]
    cmd += ["--cache-dir", str(cache), "--out", str(run)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    cold = time.perf_counter() - t0
    transferlab.fit(data, backbone=spec, cache_dir=str(cache))  # imports, first optimizer step
    t0 = time.perf_counter()
    clf = transferlab.fit(data, backbone=spec, cache_dir=str(cache))
    return cold, time.perf_counter() - t0, clf.metrics["test"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "datasets" / "cats_vs_dogs_small")
    ap.add_argument(
        "--backbone",
        default=f"local-dir:{SHARED / 'weights' / 'mobilenetv2_100.tf_quant_in1k'}",
    )
    ap.add_argument("--skip-naive", action="store_true", help="the slowest baseline (~40 s)")
    ap.add_argument("--limit-only", action="store_true", help="only the engine-limit figures")
    ap.add_argument("--reps", type=int, default=3, help="alternated engine-limit passes")
    ap.add_argument("--images", type=int, help="engine limit on the first N images only")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: not found (the benchmark needs ../shared)")
    os.environ.setdefault("TRANSFERLAB_QUIET", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    paths = all_images(args.data)
    n = len(paths)
    print(f"{n} images, {os.cpu_count()} cores, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    try:
        limits, engine = engine_limit(args.backbone, paths[: args.images], tmp, args.reps)
        print(f"engine limit [{engine}], {args.reps} alternated passes, medians:")
        for name, (model, e2e) in limits.items():
            print(
                f"  {name:>10}: model-only {model:6.1f} img/s, end-to-end {e2e:6.1f} img/s, "
                f"ratio {e2e / model:.3f}"
            )
        print("  (targets: ratio >= 0.85 as built; >= 230 img/s on a quiet 2-core box)")
        if args.limit_only:
            return
        ours_s, export_s, engine = transferlab_pipeline(args.backbone, paths, tmp / "exports")
        print(f"(c) transferlab [{engine}]: {n / ours_s:7.1f} img/s  ({ours_s:.1f} s)")
        print(f"    (runtime set-up incl. ONNX export: {export_s:.1f} s, not counted)")
        cl_s, _ = eager_channels_last(args.backbone, paths)
        print(f"(b) eager channels_last    : {n / cl_s:7.1f} img/s  ({cl_s:.1f} s)")
        if not args.skip_naive:
            naive_s, _ = naive(args.backbone, args.data)
            print(f"(a) naive ImageFolder NCHW : {n / naive_s:7.1f} img/s  ({naive_s:.1f} s)")
            print(f"speed-up vs (a): {naive_s / ours_s:.2f}x   (target >= 4x)")
        print(f"speed-up vs (b): {cl_s / ours_s:.2f}x   (target >= 2.5x)")
        cold_s, warm_s, acc = timed_fit(args.data, args.backbone, tmp / "cache")
        print(
            f"cold `transferlab fit` (new process, empty cache): {cold_s:.1f} s  (target <= 25 s)"
        )
        print(f"warm re-fit (cache hit, in-process):          {warm_s:.2f} s  (target <= 3 s)")
        print(f"test accuracy: {acc:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
