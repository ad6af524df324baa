"""Abuse `transferlab serve` over loopback and report how it held (issue 11's targets).

    .venv/bin/python benchmarks/serve_abuse.py RUN [--slow 1000] [--uploads 50] [--upload-mb 19]

The server runs in a subprocess on 127.0.0.1 (a free port) started with a soft open-files limit
of ``--server-nofile`` (1024, a common default; the server raises it itself). While ``--slow``
connections trickle request-head bytes (slowloris) and ``--slow-bodies`` trickle a body, it
sends ``--uploads`` concurrent uploads of a ``--upload-mb`` MB image (a client that gets a 503
"server busy" retries after its Retry-After, as a well-behaved client does) and probes
``/health`` every 50 ms. Then ``--requests`` small predictions at ``--concurrency``. It prints
the /health latencies, every status seen, the server's RSS (idle, peak, after the burst) and the
size of its log, and exits 1 when a target is missed:

    /health p99 < 200 ms and every good request answered (200); RSS peak < 2.5 GB and back
    within 20% of idle after the burst; log under 1 MB.

Everything is bounded: counts by the options, time by ``--max-seconds`` (the phase is cut off).
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

GB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--slow", type=int, default=1000, help="slowloris connections")
    ap.add_argument("--slow-bodies", type=int, default=20, help="connections trickling a body")
    ap.add_argument("--uploads", type=int, default=50)
    ap.add_argument("--upload-mb", type=float, default=19.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--server-nofile", type=int, default=1024)
    ap.add_argument("--burst-seconds", type=float, default=25.0, help="least burst length")
    ap.add_argument("--max-seconds", type=float, default=90.0, help="per phase")
    ap.add_argument("--server-args", default="", help="extra flags for the server, one string")
    args = ap.parse_args()
    _raise_own_nofile(args.slow + args.slow_bodies + args.uploads + 256)

    port = _free_port()
    log_path = Path(tempfile.mkstemp(prefix="serve_abuse_", suffix=".log")[1])
    server = _start_server(args, port, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)
        proc = psutil.Process(server.pid)
        small = _jpeg(256, 256)
        for _ in range(10):  # warm up the runtime and the allocator
            httpx.post(f"{base}/predict", files={"file": ("a.jpg", small)}, timeout=30)
        time.sleep(1.0)
        idle = proc.memory_info().rss
        sampler = _RssSampler(proc)
        sampler.start()
        burst = asyncio.run(_burst(base, port, args, _big_image(args.upload_mb)))
        time.sleep(3.0)  # let the server release what the burst took
        after = proc.memory_info().rss
        load = asyncio.run(_load(base, small, args.requests, args.concurrency, args.max_seconds))
        sampler.stop()
        alive = httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        _stop(server)
    log_bytes = log_path.stat().st_size
    ok = _report(args, burst, load, idle, sampler.peak, after, log_bytes, alive, log_path)
    sys.exit(0 if ok else 1)


# -- the burst: slowloris + slow bodies + big uploads, with /health probed throughout ---------


async def _burst(base: str, port: int, args: argparse.Namespace, big: bytes) -> dict:
    stop = asyncio.Event()
    slow_closed: Counter[str] = Counter()
    t0 = time.perf_counter()
    slow = [asyncio.create_task(_slowloris(port, stop, slow_closed)) for _ in range(args.slow)]
    bodies = [asyncio.create_task(_slow_body(port, stop)) for _ in range(args.slow_bodies)]
    await asyncio.sleep(1.0)  # the slow connections are in place before the good traffic starts
    ctx = multiprocessing.get_context("spawn")
    probe_stop, (probe_out, probe_in) = ctx.Event(), ctx.Pipe(duplex=False)
    prober = ctx.Process(target=_probe_health, args=(base, probe_stop, probe_in), daemon=True)
    prober.start()
    limits = httpx.Limits(max_connections=args.uploads, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        uploads = [_upload(client, base, big, args.max_seconds) for _ in range(args.uploads)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*uploads), args.max_seconds)
        except TimeoutError:
            results = [("cut off", 0, 0.0)]
    # The slow connections stay at least --burst-seconds, past the server's timeouts.
    await asyncio.sleep(max(0.5, args.burst_seconds - (time.perf_counter() - t0)))
    stop.set()
    probe_stop.set()
    health, health_status = probe_out.recv()
    prober.join(10)
    slow_body_status = Counter(await asyncio.gather(*bodies))
    await asyncio.gather(*slow, return_exceptions=True)
    return {
        "seconds": time.perf_counter() - t0,
        "health_ms": health,
        "health_status": Counter(health_status),
        "uploads": Counter(r[0] for r in results),
        "upload_retries": sum(r[1] for r in results),
        "upload_s": [r[2] for r in results],
        "slow_closed": slow_closed,
        "slow_bodies": slow_body_status,
    }


async def _slowloris(port: int, stop: asyncio.Event, closed: Counter[str]) -> None:
    """One connection sending a request head one byte per second, never finishing it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        closed[f"connect failed: {type(exc).__name__}"] += 1
        return
    t0 = time.perf_counter()
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    try:
        for byte in head:
            if stop.is_set():
                closed["still open at the end"] += 1
                return
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    closed[f"closed by server after ~{round(time.perf_counter() - t0)} s"] += 1
                    return
    except OSError:
        closed[f"reset by server after ~{round(time.perf_counter() - t0)} s"] += 1
    finally:
        writer.close()


async def _slow_body(port: int, stop: asyncio.Event) -> str:
    """A POST declaring 1 MB and sending 100 bytes a second: the server should answer 408."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed: {type(exc).__name__}"
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    try:
        writer.write(head)
        while not stop.is_set():
            writer.write(b" " * 100)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                got = await asyncio.wait_for(reader.read(64), 1.0)
                if got:
                    return got.split(b"\r\n", 1)[0].decode(errors="replace")
                return "closed without a response"
        return "no answer by the end"
    except OSError:
        return "reset"
    finally:
        writer.close()


def _probe_health(base: str, stop: Any, out: Any) -> None:
    """In its own process (so the load generator's event loop does not delay it): GET /health
    every 50 ms on one keep-alive connection until ``stop``; sends (latencies, statuses)."""
    latencies: list[float] = []
    status: Counter[int | str] = Counter()
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status[client.get(f"{base}/health").status_code] += 1
            except httpx.HTTPError as exc:
                status[type(exc).__name__] += 1
            latencies.append(1e3 * (time.perf_counter() - t0))
            time.sleep(0.05)
    out.send((latencies, dict(status)))


async def _upload(
    client: httpx.AsyncClient, base: str, blob: bytes, budget_s: float
) -> tuple[str, int, float]:
    """(final status, 503 retries, seconds): retries a 503 after its Retry-After, in budget."""
    t0 = time.perf_counter()
    retries = 0
    while True:
        try:
            r = await client.post(f"{base}/predict", files={"file": ("big.ppm", blob)})
        except httpx.HTTPError as exc:
            return type(exc).__name__, retries, time.perf_counter() - t0
        if r.status_code != 503 or time.perf_counter() - t0 > budget_s:
            return str(r.status_code), retries, time.perf_counter() - t0
        retries += 1
        await asyncio.sleep(float(r.headers.get("retry-after", "1")) * (0.5 + np.random.rand()))


# -- plain load after the burst --------------------------------------------------------------


async def _load(base: str, blob: bytes, n: int, concurrency: int, budget_s: float) -> dict:
    latencies: list[float] = []
    status: Counter[int | str] = Counter()
    todo = iter(range(n))
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            for _ in todo:
                if time.perf_counter() - t0 > budget_s:
                    status["cut off"] += 1
                    continue
                t = time.perf_counter()
                try:
                    r = await client.post(f"{base}/predict", files={"file": ("a.jpg", blob)})
                    status[r.status_code] += 1
                except httpx.HTTPError as exc:
                    status[type(exc).__name__] += 1
                latencies.append(1e3 * (time.perf_counter() - t))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - t0, "ms": latencies, "status": status}


# -- report ----------------------------------------------------------------------------------


def _report(args, burst, load, idle, peak, after, log_bytes, alive, log_path) -> bool:
    h = sorted(burst["health_ms"]) or [float("nan")]
    p99 = h[min(len(h) - 1, int(0.99 * len(h)))]
    lat = sorted(load["ms"]) or [float("nan")]
    lat99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(
        f"burst: {args.slow} slowloris + {args.slow_bodies} slow-body connections, "
        f"{args.uploads} concurrent {args.upload_mb:g} MB uploads, {burst['seconds']:.1f} s"
    )
    print(f"  slowloris connections: {dict(burst['slow_closed'])}")
    print(f"  slow bodies: {dict(burst['slow_bodies'])}")
    up_s = sorted(burst["upload_s"])
    print(
        f"  uploads: {dict(burst['uploads'])} after {burst['upload_retries']} retried 503s; "
        f"slowest {up_s[-1]:.1f} s"
    )
    print(
        f"  /health: {len(h)} probes {dict(burst['health_status'])}, p50 "
        f"{statistics.median(h):.1f} ms, p99 {p99:.1f} ms, max {h[-1]:.1f} ms"
    )
    print(
        f"load: {args.requests} requests at {args.concurrency}: {dict(load['status'])} in "
        f"{load['seconds']:.1f} s ({len(lat) / load['seconds']:.0f}/s), p50 "
        f"{statistics.median(lat):.0f} ms, p99 {lat99:.0f} ms"
    )
    print(
        f"server RSS: idle {idle / GB:.2f} GB, peak {peak / GB:.2f} GB, after the burst "
        f"{after / GB:.2f} GB ({100 * (after - idle) / idle:+.0f}% of idle)"
    )
    print(f"server log: {log_bytes} bytes ({log_path}); alive at the end: {alive}")
    good = (
        burst["uploads"] == Counter({"200": args.uploads})
        and set(burst["health_status"]) == {200}
        and set(load["status"]) == {200}
    )
    checks = {
        "/health p99 < 200 ms": p99 < 200,
        "every good request answered": good,
        "RSS peak < 2.5 GB": peak < 2.5 * GB,
        "RSS back within 20% of idle": after <= 1.2 * idle,
        "log < 1 MB": log_bytes < 1024**2,
        "server alive": alive,
    }
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    return all(checks.values())


# -- helpers ---------------------------------------------------------------------------------


class _RssSampler(threading.Thread):
    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _big_image(mb: float) -> bytes:
    """An uncompressed PPM of about ``mb`` MB (a real image, decoded in full by the server)."""
    side = int((mb * 1e6 / 3) ** 0.5)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return b"P6\n%d %d\n255\n" % (side, side) + pixels.tobytes()


def _raise_own_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    nofile = args.server_nofile

    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    cmd = [sys.executable, "-m", "transferlab.serve", str(args.run), "--port", str(port)]
    cmd += args.server_args.split()
    log = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("server did not become healthy")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
