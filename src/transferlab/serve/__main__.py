"""``python -m transferlab.serve RUN [--host H] [--port P] ...`` (used by the benchmarks)."""

from __future__ import annotations

import argparse

from transferlab.errors import TransferlabError
from transferlab.serve.app import run_server
from transferlab.serve.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PIXELS,
    MB,
)
from transferlab.serve.limits import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m transferlab.serve")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / MB)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--max-in-flight-mb", type=float, default=DEFAULT_MAX_IN_FLIGHT / MB)
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT)
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    try:
        run_server(
            a.run,
            host=a.host,
            port=a.port,
            log_level=a.log_level,
            max_batch=a.max_batch,
            batch_wait_ms=a.batch_wait_ms,
            timeout_s=a.timeout,
            max_body_bytes=int(a.max_body_mb * MB),
            max_pixels=a.max_pixels,
            max_in_flight_bytes=int(a.max_in_flight_mb * MB),
            max_connections=a.max_connections,
            header_timeout_s=a.header_timeout,
            body_timeout_s=a.body_timeout,
        )
    except TransferlabError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
