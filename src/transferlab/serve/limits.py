"""Limits below the ASGI app, where slow or greedy clients are stopped before they cost anything.

* :class:`GuardedH11` (uvicorn's HTTP/1.1 protocol plus two rules): a connection beyond
  ``max_connections`` is answered 503 and closed at once; a connection that has not sent a
  complete request head within ``header_timeout_s`` (a new connection, or an idle keep-alive
  one trickling bytes) is closed. Uvicorn alone keeps them open while bytes trickle in.
* :class:`RateLimitFilter`: at most a few records per message per window on the server's log
  handlers, then one line saying how many were suppressed: no log storm, whatever fails.
* :func:`tune_process`: raise the open-files soft limit to what the connection cap needs, and
  make glibc return freed upload buffers to the OS (see the function), so memory comes back
  after a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from transferlab.serve.guards import log
from transferlab.system import M_ARENA_MAX, M_MMAP_THRESHOLD, glibc

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "GuardedH11",
    "install_log_limits",
    "RateLimitFilter",
    "guarded_protocol",
    "release_memory",
    "tune_process",
]

_BUSY_BODY = b'{"error": "server busy", "detail": "too many open connections; retry"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_HEADER_TIMEOUT = 10.0
# File descriptors the process needs besides client sockets (model files, threads, pipes).
_SPARE_FDS = 256


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-head timeout (see module)."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    header_timeout_s = DEFAULT_HEADER_TIMEOUT
    refused = 0  # connections answered 503 by the cap, for /health and the benchmark
    timed_out = 0  # connections closed for a slow request head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            type(self).refused += 1
            _warn_limited("connection refused: over --max-connections %d", self.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a complete request head arrived
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        # Armed before the parent handles pipelined requests, which cancel it again.
        self._arm_head_timer()
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            type(self).timed_out += 1
            self.transport.close()


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[GuardedH11]:
    """A :class:`GuardedH11` subclass with these limits (a class: uvicorn instantiates it)."""
    return type(
        "GuardedH11Limits",
        (GuardedH11,),
        {"max_connections": max_connections, "header_timeout_s": header_timeout_s},
    )


_DIGITS = re.compile(r"\d+")


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not break logging
        return str(record.msg)


class RateLimitFilter(logging.Filter):
    """Pass at most ``burst`` records per (logger, message) per ``window_s``; the first record
    after a window with suppressed ones says how many were dropped. Tracebacks of repeated
    records are dropped with them."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, n, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        # Keyed by the message with its numbers blanked: "503 server busy: holding 1234 bytes"
        # and "... 5678 bytes" are one kind, a 408 and a 413 are others.
        key = (record.name, _DIGITS.sub("#", _message(record))[:160])
        now = time.monotonic()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window_s:
            dropped = int(state[2]) if state else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 1000:  # bounded: forget old keys
                self._seen = {key: self._seen[key]}
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar message(s) suppressed)"
            return True
        state[1] += 1
        if state[1] <= self.burst:
            return True
        state[2] += 1
        return False


_limit_filter = RateLimitFilter()


def _warn_limited(msg: str, *args: Any) -> None:
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, msg, args, None)
    if log.isEnabledFor(logging.WARNING) and _limit_filter.filter(record):
        log.handle(record)


def install_log_limits(burst: int = 5, window_s: float = 10.0) -> None:
    """Put a :class:`RateLimitFilter` on every handler of the root logger (uvicorn's and
    asyncio's records propagate there when uvicorn is started with ``log_config=None``)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RateLimitFilter) for f in handler.filters):
            handler.addFilter(RateLimitFilter(burst, window_s))


def tune_process(max_connections: int) -> int:
    """Prepare the process for many connections and bursts of big uploads; returns the
    connection cap that fits the open-files limit (lowered when the hard limit is smaller).

    glibc raises its mmap threshold each time a big block is freed, after which 20 MB upload
    buffers come from the heap and stay with the process; a fixed 1 MiB threshold keeps them
    mmapped (returned on free), and two arenas per process stop each thread from growing its own.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
        libc.mallopt(M_ARENA_MAX, 2)
    try:
        import resource
    except ImportError:  # Windows: no rlimits
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + _SPARE_FDS
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    usable = (soft if soft != resource.RLIM_INFINITY else want) - _SPARE_FDS
    if usable < max_connections:
        log.warning(
            "open-files limit %d allows %d connections, not %d; raise `ulimit -n`",
            soft,
            max(usable, 1),
            max_connections,
        )
    return max(min(max_connections, usable), 1)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
