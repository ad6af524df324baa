"""How `transferlab fit` scales with the number of images: time, memory and cache per image.

    .venv/bin/python benchmarks/scale.py [--sizes 1300,5000,20000] [--quick] [--work DIR]

For each size N it builds N distinct images from the shared photos (a random crop of 70–100% of
the area, a brightness/contrast jitter and a JPEG re-encode at quality 80–95, seeded), laid out
like cats_vs_dogs_small (train/val/test = 54/23/23%, labels of the source photos), then times as
subprocesses, the way a user runs them:

* cold fit: `transferlab fit DATA --out RUN --overwrite` with an empty feature cache (scan,
  export, extraction, head, evaluation, report);
* warm re-fit: the same command again (scan index and features cached);
* report: `transferlab report RUN`.

Peak RSS is the main process's high-water mark (``wait4``'s ``ru_maxrss``), and sampled (psutil,
every 50 ms) for its worker processes (the scan's: decoding runs in threads of the main process);
the cache folder's files and bytes are counted after the cold fit. The last lines give
per-image slopes between the smallest and the largest size (fixed costs cancel), which
docs/cluster.md turns into a projection for a million images. Images and runs go to --work
(default: a temporary folder outside the repository, deleted afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SOURCE = SHARED / "datasets" / "cats_vs_dogs_small"
BACKBONE = f"local-dir:{SHARED / 'weights' / 'mobilenetv2_100.tf_quant_in1k'}"
SPLITS = (("train", 0.54), ("val", 0.23), ("test", 0.23))
QUICK_SIZES = "200,600"


def source_photos() -> list[tuple[str, str]]:
    """(path, class) of every shared photo, sorted: the material every size is made from."""
    return sorted((str(p), p.parent.name) for p in SOURCE.rglob("*.jpg"))


def variant(args: tuple[str, str, int]) -> None:
    """Write one distinct image: a seeded crop, jitter and re-encode of the source photo."""
    src, dest, seed = args
    rng = random.Random(seed)
    img = Image.open(src).convert("RGB")
    w, h = img.size
    scale = rng.uniform(0.7, 1.0) ** 0.5
    cw, ch = max(32, int(w * scale)), max(32, int(h * scale))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(80, 95))
    Path(dest).write_bytes(buf.getvalue())


def build_dataset(root: Path, n: int, photos: list[tuple[str, str]]) -> None:
    """``root/{train,val,test}/{cat,dog}/``: ``n`` distinct images (seeded by position)."""
    jobs = []
    start = 0
    for i, (split, share) in enumerate(SPLITS):
        count = n - start if i == len(SPLITS) - 1 else round(n * share)
        for k in range(start, start + count):
            src, label = photos[k % len(photos)]
            dest = root / split / label / f"{label}.{k:07d}.jpg"
            jobs.append((src, str(dest), k))
        start += count
    for folder in {Path(dest).parent for _, dest, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(variant, jobs, chunksize=64))


def timed(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its wall time, its peak RSS (MiB, the kernel's high-water mark, so short
    spikes count) and the peak RSS of its child processes (sampled every 50 ms)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child never blocks
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        main = psutil.Process(proc.pid)
        peak_workers = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                kids = main.children(recursive=True)
                peak_workers = max([peak_workers] + [_rss(k) for k in kids])
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    mib = 2**20
    return {
        "s": seconds,
        # ru_maxrss (KiB on Linux) of the process and of the children it waited for (the
        # scan workers, smaller): the main process's peak. Its floor is this script's own
        # RSS (the child starts as a copy of it), ~50 MiB, far below the figures measured.
        "rss_main_mib": usage.ru_maxrss * 1024 / mib,
        "rss_worker_mib": peak_workers / mib,
    }


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def folder_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def measure(work: Path, n: int, photos: list[tuple[str, str]], backbone: str) -> dict:
    data, cache, run = work / f"data-{n}", work / f"cache-{n}", work / f"run-{n}"
    t0 = time.perf_counter()
    build_dataset(data, n, photos)
    build_s = time.perf_counter() - t0
    tl = [sys.executable, "-m", "transferlab"]
    fit = tl + ["fit", str(data), "--backbone", backbone, "--out", str(run), "--overwrite"]
    env_cache = ["--cache-dir", str(cache)]
    cold = timed(fit + env_cache)
    files, nbytes = folder_size(cache)
    warm = timed(fit + env_cache)
    report = timed(tl + ["report", str(run)])
    return {
        "n": n, "build_s": build_s, "cold": cold, "warm": warm, "report": report,
        "cache_files": files, "cache_bytes": nbytes,
    }  # fmt: skip


def print_row(r: dict) -> None:
    c, w, rep = r["cold"], r["warm"], r["report"]
    print(
        f"{r['n']:>7} | cold {c['s']:7.1f} s  warm {w['s']:6.1f} s  report {rep['s']:6.1f} s"
        f" | RSS main {c['rss_main_mib']:6.0f} / {w['rss_main_mib']:6.0f} MiB, worker "
        f"{c['rss_worker_mib']:5.0f} MiB | cache {r['cache_files']} files "
        f"{r['cache_bytes'] / 2**20:7.1f} MiB",
        flush=True,
    )


def slopes(rows: list[dict]) -> dict[str, float]:
    """Per-image costs between the smallest and the largest size (fixed costs cancel)."""
    a, b = rows[0], rows[-1]
    dn = b["n"] - a["n"]
    return {
        "cold_ms": 1e3 * (b["cold"]["s"] - a["cold"]["s"]) / dn,
        "warm_ms": 1e3 * (b["warm"]["s"] - a["warm"]["s"]) / dn,
        "report_ms": 1e3 * (b["report"]["s"] - a["report"]["s"]) / dn,
        "rss_main_kib": 1024 * (b["cold"]["rss_main_mib"] - a["cold"]["rss_main_mib"]) / dn,
        "rss_warm_kib": 1024 * (b["warm"]["rss_main_mib"] - a["warm"]["rss_main_mib"]) / dn,
        "cache_bytes": (b["cache_bytes"] - a["cache_bytes"]) / dn,
        "cache_files": (b["cache_files"] - a["cache_files"]) / dn,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1300,5000,20000", help="comma-separated image counts")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: --sizes {QUICK_SIZES}")
    ap.add_argument("--work", type=Path, help="folder for images, caches and runs")
    ap.add_argument("--keep", action="store_true", help="keep --work's contents afterwards")
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE}: not found (the benchmark needs ../shared)")
    sizes = sorted(int(s) for s in (QUICK_SIZES if args.quick else args.sizes).split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="tl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFERLAB_QUIET", "1")
    print(f"sizes {sizes}, {psutil.cpu_count()} cores, work {work}", flush=True)
    rows = []
    try:
        for n in sizes:
            rows.append(measure(work, n, source_photos(), args.backbone))
            print_row(rows[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"rows": rows}
    if len(rows) > 1:
        result["slopes"] = s = slopes(rows)
        print(
            f"per image: cold {s['cold_ms']:.2f} ms, warm {s['warm_ms']:.3f} ms, report "
            f"{s['report_ms']:.3f} ms, RSS cold {s['rss_main_kib']:.1f} KiB / warm "
            f"{s['rss_warm_kib']:.1f} KiB, cache {s['cache_bytes']:.0f} B in "
            f"{s['cache_files']:.4f} files"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
