"""Load-test `transferlab serve` over real HTTP, and check it survives malformed input.

    .venv/bin/python benchmarks/serve_load.py RUN [--requests 2000] [--concurrency 32]
    .venv/bin/python benchmarks/serve_load.py RUN --malformed

The server runs in a subprocess on 127.0.0.1 (a free port). The load generator is a bounded
httpx async client: N single-image multipart requests, at most C in flight, then it stops. It
prints throughput, p50/p99 latency and errors, then stops the server and runs batch prediction
(the same engine, decode threads, batch 32) over the same image files in this process, for the
ratio server/batch (target ≥ 70%). ``--malformed`` sends the bad-input suite instead and prints
each status code, then checks that /health still answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=Path, default=None, help="default: the run's test split")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--malformed", action="store_true", help="run the bad-input suite instead")
    args = ap.parse_args()

    files = _image_files(args.run, args.images)
    port = _free_port()
    server = _start_server(args, port)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)
        if args.malformed:
            ok = malformed_suite(base, files[0])
            sys.exit(0 if ok else 1)
        print(f"server up on {base}; {len(files)} distinct images")
        blobs = [Path(f).read_bytes() for f in files]
        result = asyncio.run(load(base, blobs, args.requests, args.concurrency))
        health = httpx.get(f"{base}/health").json()
    finally:
        _stop(server)
    lat = sorted(result["latencies"])
    rate = result["ok"] / result["seconds"]
    print(
        f"\nload: {args.requests} requests, concurrency {args.concurrency}, "
        f"{result['seconds']:.1f} s"
    )
    print(f"  throughput  {rate:.1f} req/s (= images/s)")
    print(f"  latency     p50 {_pct(lat, 50) * 1e3:.0f} ms, p99 {_pct(lat, 99) * 1e3:.0f} ms")
    print(f"  errors      {result['errors']} ({json.dumps(result['statuses'])})")
    print(f"  batching    {health['batches']} batches, mean {health['mean_batch']:.1f} images")

    batch_rate = batch_predict(args.run, files, args.requests)
    print(f"\nbatch predict (same engine, same images): {batch_rate:.1f} images/s")
    ratio = rate / batch_rate
    print(f"server / batch: {ratio:.0%}  (target >= 70%: {'OK' if ratio >= 0.7 else 'MISSED'})")


# --------------------------------------------------------------------------------------------


async def load(base: str, blobs: list[bytes], n: int, concurrency: int) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal next_i, errors
            while next_i < n:
                i = next_i
                next_i += 1
                blob = blobs[i % len(blobs)]
                t = time.perf_counter()
                try:
                    r = await client.post(
                        "/predict", files={"file": (f"{i}.jpg", blob, "image/jpeg")}
                    )
                    key = str(r.status_code)
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    errors += 1
                latencies.append(time.perf_counter() - t)
                statuses[key] = statuses.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {
        "latencies": latencies,
        "statuses": statuses,
        "errors": errors,
        "ok": statuses.get("200", 0),
        "seconds": seconds,
    }


def batch_predict(run: Path, files: list[str], n: int) -> float:
    """Images/s of PredictionEngine over the same files (repeated to about n images)."""
    import transferlab
    from transferlab.predict import PredictionEngine

    engine = PredictionEngine(transferlab.load(run), batch_size=32)
    engine.warm_up()
    reps = max(1, round(n / len(files)))
    t = time.perf_counter()
    done = sum(1 for p in engine.iter_predict(files * reps) if p.error is None)
    return done / (time.perf_counter() - t)


def malformed_suite(base: str, good_file: str) -> bool:
    good = Path(good_file).read_bytes()

    def files(blob: bytes, field: str = "file") -> dict:
        return {"files": {field: ("x.jpg", blob, "image/jpeg")}}

    cases = {
        "valid jpeg": (files(good), 200),
        "truncated jpeg": (files(good[: len(good) // 2]), 422),
        "zero bytes": (files(b""), 422),
        "text named .jpg": (files(b"just some text, not a picture"), 415),
        "20000x20000 png bomb": (files(png_bomb(20000, 20000)), 413),
        "wrong field name": (files(good, field="image"), 422),
        "oversized body (21 MiB)": (files(b"\xff\xd8\xff" + bytes(21 * 1024 * 1024)), 413),
        "bad base64 json": ({"json": {"images": ["***"]}}, 422),
        "base64 json": ({"json": {"images": [base64.b64encode(good).decode()]}}, 200),
    }
    ok = True
    print(f"{'case':28s} {'status':>6s}  body")
    with httpx.Client(base_url=base, timeout=60) as client:
        for name, (kwargs, expected) in cases.items():
            try:
                r = client.post("/predict", **kwargs)
                status, body = r.status_code, r.text[:110]
            except httpx.HTTPError as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            mark = "ok" if status == expected else f"EXPECTED {expected}"
            ok &= status == expected
            print(f"{name:28s} {status:6d}  {body}  [{mark}]")
        h = client.get("/health")
    print(f"\nGET /health after the suite: {h.status_code} {h.json()['status']}")
    return ok and h.status_code == 200


def png_bomb(w: int, h: int) -> bytes:
    """A PNG header claiming w×h pixels, with a few hundred bytes of actual data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (w + 7) // 8) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------


def _image_files(run: Path, images: Path | None) -> list[str]:
    if images is not None:
        from transferlab.predict import iter_sources

        return list(iter_sources(images))
    summary = json.loads((run / "data.json").read_text())
    from transferlab.data.discover import DatasetIndex

    index = DatasetIndex.from_dict(summary["index"])
    files = [s.path for s in index.samples if s.split == "test" and os.path.isfile(s.path)]
    if not files:
        raise SystemExit("the run's test images are not on disk; pass --images DIR")
    return files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "transferlab.serve",
        str(args.run),
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--timeout",
        "60",
        "--log-level",
        "warning",
    ]
    # Its stderr (one warning line per refused request) is shown as it comes.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


if __name__ == "__main__":
    main()
