"""Prediction files: csv / jsonl / json written row by row, and resuming an interrupted one."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from transferlab.errors import TransferlabError
from transferlab.progress import console

__all__ = ["FORMATS", "already_done", "make_writer", "open_output", "print_error", "read_done"]

#: Output formats: csv / jsonl are streamed and resumable; json (one array) is streamed only.
FORMATS = ("csv", "jsonl", "json")


def resolve_format(path: Path | None, fmt: str | None) -> str:
    """``fmt``, or the one ``path``'s suffix names (jsonl without either); both, when they
    name different formats, are an error rather than CSV in a file called .json."""
    named = path.suffix.lower().lstrip(".") if path is not None else ""
    named = "jsonl" if named == "ndjson" else named
    if fmt is not None and named in FORMATS and named != fmt:
        raise TransferlabError(
            f"{path}: the name says {named} but the format asked for is {fmt}; "
            f"name the file .{fmt} or drop --format"
        )
    fmt = fmt or named or "jsonl"
    if fmt not in FORMATS:
        raise TransferlabError(f"output format {fmt!r} is not one of: {', '.join(FORMATS)}")
    return fmt


def csv_header(k: int) -> list[str]:
    # label/probability is the decision (may be "unknown"); label1..k/prob1..k the ranking.
    return [
        "path",
        "label",
        "probability",
        *[f for i in range(1, k + 1) for f in (f"label{i}", f"prob{i}")],
    ]


def print_error(path: str, reason: str) -> None:
    """Report an unreadable source on the console (the default ``on_error``)."""
    console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False, soft_wrap=True)


def already_done(path: Path | None, fmt: str, k: int, *, resume: bool, overwrite: bool) -> set[str]:
    """Paths a resumed run skips; refuses to resume what cannot be, or to clobber a result."""
    if path is None and resume:
        raise TransferlabError("--resume needs --output FILE (.csv or .jsonl)")
    if resume and fmt == "json":
        raise TransferlabError("--resume works with .csv or .jsonl output, not .json")
    if path is None or not path.exists() or path.stat().st_size == 0:
        return set()
    if resume:
        return read_done(path, fmt, header=csv_header(k))
    if not overwrite:
        raise TransferlabError(
            f"{path}: already exists; pass --resume to continue that run or "
            "--overwrite to replace it"
        )
    return set()


@contextlib.contextmanager
def open_output(path: Path | None, stream: IO[str] | None, *, append: bool) -> Iterator[IO[str]]:
    """``path`` opened for writing (appended to when resuming), or ``stream`` (stdout) without
    one; flushed at the end, and a file synced to disk."""
    if path is None:
        fh = stream or sys.stdout
        yield fh
        fh.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a file name that is not valid UTF-8 is written back byte for byte, so
    # --resume recognises it
    with path.open(
        "a" if append else "w", newline="", encoding="utf-8", errors="surrogateescape"
    ) as out:
        yield out
        out.flush()
        os.fsync(out.fileno())


class _Writer:
    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _JsonlWriter(_Writer):
    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class _JsonWriter(_Writer):
    """One JSON array, still written row by row (resume is not possible for it)."""

    def __init__(self, fh: IO[str]) -> None:
        super().__init__(fh)
        self.first = True
        fh.write("[")

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(("\n  " if self.first else ",\n  ") + json.dumps(row, ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        self.fh.write("\n]\n" if not self.first else "]\n")


class _CsvWriter(_Writer):
    def __init__(self, fh: IO[str], k: int, fresh: bool) -> None:
        super().__init__(fh)
        self.k = k
        self.csv = csv.writer(fh, lineterminator="\n")
        if fresh:
            self.csv.writerow(csv_header(k))

    def write(self, row: dict[str, Any]) -> None:
        if "error" in row:
            return  # CSV keeps results only; the error went to stderr
        ranked = [v for lab, p in row["top_k"] for v in (lab, f"{p:.6f}")]
        self.csv.writerow([row["path"], row["label"], f"{row['probability']:.6f}", *ranked])


def make_writer(fmt: str, fh: IO[str], k: int, *, fresh: bool) -> _Writer:
    """A row writer for ``fmt``; ``fresh``: a new file (CSV writes its header)."""
    if fmt == "csv":
        return _CsvWriter(fh, k, fresh)
    if fmt == "json":
        return _JsonWriter(fh)
    return _JsonlWriter(fh)


def read_done(
    path: str | os.PathLike[str], fmt: str, *, header: list[str] | None = None
) -> set[str]:
    """Paths already in an output file, after cutting off a torn (unterminated) last line.

    A run killed mid-write leaves at most one partial line at the end: it is truncated away so
    appended rows start on a line of their own, and that path is predicted again.
    """
    path = Path(path)
    _truncate_torn_tail(path)
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        if fmt == "csv":
            return _csv_done(path, fh, header)
        return _jsonl_done(path, fh)


def _csv_done(path: Path, fh: IO[str], header: list[str] | None) -> set[str]:
    reader = csv.reader(fh)
    first = next(reader, None)
    if first is None:
        return set()
    if header is not None and first != header:
        raise TransferlabError(
            f"{path}: its columns ({','.join(first)}) differ from this run's "
            f"({','.join(header)}); resume with the same --top-k or use a new --output"
        )
    return {row[0] for row in reader if row}


def _jsonl_done(path: Path, fh: IO[str]) -> set[str]:
    done: set[str] = set()
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            raise TransferlabError(
                f"{path}:{n}: not a prediction row; is this the output of a predict run?"
            ) from None
    return done


def _truncate_torn_tail(path: Path) -> None:
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline; everything after it is the torn line.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            data = fh.read(pos - start)
            cut = data.rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)
