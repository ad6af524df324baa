"""CLI commands for shipping a model: ``predict`` (streaming, resumable), ``export``, ``serve``.

``register(app)`` adds them to the main typer app; it replaces an existing ``predict`` command,
so there is exactly one prediction path (``transferlab.predict.PredictionEngine``) behind the
API, this CLI and the HTTP server.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.errors import TransferlabError
from transferlab.progress import out_console

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``predict``, ``export`` and ``serve`` to ``app``."""
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("serve")(serve)


def predict(
    run: Path = typer.Argument(..., help="A run folder written by `fit`, or an exported .onnx."),
    sources: list[str] = typer.Argument(..., help="Image files, folders (recursive) or globs."),
    top_k: int = typer.Option(1, help="How many ranked labels per image."),
    output: Path | None = typer.Option(
        None, "--output", "--out", "-o", help="results.csv | .jsonl | .json, written as it goes."
    ),
    format: str | None = typer.Option(
        None, help="table | csv | jsonl | json (default: table on stdout, else by suffix)."
    ),
    threshold: float | None = typer.Option(
        None, help="Label 'unknown' when the top probability is below this (0–1)."
    ),
    resume: bool = typer.Option(False, help="Continue an interrupted --output file."),
    overwrite: bool = typer.Option(False, help="Replace an existing --output file."),
    batch_size: int = typer.Option(32),
    workers: int | None = typer.Option(None, help="Decode threads (default: all cores)."),
) -> None:
    """Labels with probabilities, streamed in constant memory; unreadable files never stop it.

    With --output rows are flushed after every batch, so an interrupted run can --resume.
    """
    import transferlab
    from transferlab.predict import ExportedClassifier, PredictionEngine, is_exported_file

    if format not in (None, "table", "csv", "jsonl", "json"):
        raise TransferlabError("--format takes table, csv, jsonl or json")
    if format == "table" and output is not None:
        raise TransferlabError("--format table prints to the terminal; use .csv/.jsonl for files")
    model = ExportedClassifier(run) if is_exported_file(run) else transferlab.load(run)
    engine = PredictionEngine(model, batch_size=batch_size, workers=workers, threshold=threshold)
    with _exit_cleanly_on_sigterm():
        _predict(engine, sources, output, format, top_k, resume, overwrite)


def _predict(
    engine: Any,
    sources: list[str],
    output: Path | None,
    format: str | None,
    top_k: int,
    resume: bool,
    overwrite: bool,
) -> None:
    from transferlab.predict import print_error

    if output is None and format in (None, "table"):
        _print_table(engine, sources, top_k)
        return
    fmt = None if format in (None, "table") else format
    resolved = fmt or (output.suffix.lower().lstrip(".") if output else "jsonl")
    summary = engine.run(
        sources,
        output,
        fmt=fmt,
        top_k=top_k,
        resume=resume,
        overwrite=overwrite,
        # CSV has no error column: unreadable files are listed on stderr instead.
        on_error=print_error if resolved == "csv" else _quiet,
    )
    if summary.predicted + summary.failed + summary.resumed == 0:
        raise _nothing_matched(sources)
    line = f"{summary.predicted} predicted, {summary.failed} unreadable"
    if summary.resumed:
        line += f", {summary.resumed} already in {output}"
    line += f" ({summary.images_per_s:.1f} img/s)"
    if output is not None:
        line += f" → {output}"
    _stderr(line)


@contextlib.contextmanager
def _exit_cleanly_on_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) → SystemExit, so the decode pool is shut down and
    the output is flushed and closed on the way out; by default Python dies at once. The
    previous handler is restored afterwards."""
    import signal
    import threading

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet(path: str, reason: str) -> None:
    """JSONL/JSON keep the error in the row; one stderr line per file would only be noise."""


def _print_table(engine: Any, sources: list[str], top_k: int) -> None:
    from transferlab.predict import print_error
    from transferlab.predict.results import ranked_count

    k = ranked_count(top_k, len(engine.classes))
    table = Table()
    table.add_column("image")
    table.add_column("label")
    for i in range(k):
        table.add_column(f"#{i + 1}")
    ok = bad = 0
    for pred in engine.iter_predict(sources):
        if pred.probs is None:
            bad += 1
            print_error(pred.path, pred.error or "")
            continue
        ok += 1
        label, _ = engine.label(pred.probs)
        table.add_row(
            pred.path, label, *(f"{lab} {p:.3f}" for lab, p in engine.top_k(pred.probs, k))
        )
    if ok + bad == 0:
        raise _nothing_matched(sources)
    out_console.print(table)
    if bad:
        _stderr(f"{ok} predicted, {bad} unreadable")


def _nothing_matched(sources: list[str]) -> TransferlabError:
    return TransferlabError(
        f"no images in {', '.join(sources)}: the paths, folders and globs matched no file"
    )


def _stderr(line: str) -> None:
    from transferlab.progress import console

    console.print(line, highlight=False, soft_wrap=True)


def export(
    run: Path = typer.Argument(..., help="A run folder written by `fit`."),
    format: str = typer.Option("onnx", help="onnx | torchscript"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="File to write (default: RUN/model.onnx or RUN/model.pt)."
    ),
    quantize: str | None = typer.Option(None, help="int8 (ONNX): smaller and faster on CPU."),
    data: Path | None = typer.Option(
        None, help="Dataset for calibration (val/train) and the int8 accuracy check (test)."
    ),
    calibration_images: int = typer.Option(128, help="Images used to calibrate int8."),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads for checks/timing."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """One self-contained file: uint8 RGB NCHW images in, probabilities out, labels inside."""
    from transferlab.export import export_model

    if out is None:
        suffix = {"onnx": ".int8.onnx" if quantize else ".onnx", "torchscript": ".pt"}
        out = run / f"model{suffix.get(format, '.' + format)}"
    report = export_model(
        run,
        format,
        out,
        quantize=quantize,
        data=data,
        calibration_images=calibration_images,
        threads=threads,
        log=_stderr,
    )
    p = report["parity"]
    shape = "×".join(map(str, report["input"]["shape"]))
    print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB): uint8 RGB {shape} → probabilities")
    print(
        f"parity vs eager PyTorch on {p['n']} images: top-1 {p['top1_agree']}/{p['n']} agree, "
        f"max |Δp| {p['max_abs_diff']:.1e}"
    )
    q = report.get("quantization")
    if q:
        acc = q.get("accuracy")
        if acc:
            print(
                f"int8 ({q['method']}, {q['calibration_images']} calibration images): test "
                f"accuracy {acc['fp32']:.4f} → {acc['int8']:.4f} "
                f"({acc['change']:+.4f}, n={acc['n']})"
            )
        else:
            print(f"int8 ({q['method']}): no test images on disk; pass --data to measure accuracy")
        s = q["speed"]
        print(
            f"int8 speed-up {s['speedup']:.2f}× ({s['fp32_images_per_s']:.0f} → "
            f"{s['int8_images_per_s']:.0f} img/s, batch {s['batch']}, {s['threads']} threads); "
            f"size {q['fp32_bytes'] / 1e6:.1f} → {q['int8_bytes'] / 1e6:.1f} MB"
        )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, default=str))


def serve(
    run: Path = typer.Argument(..., help="A run folder written by `fit`."),
    host: str = typer.Option("127.0.0.1", help="Interface; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8000),
    max_batch: int = typer.Option(32, help="Images per inference batch."),
    batch_wait_ms: float = typer.Option(5.0, help="How long a batch waits to fill."),
    timeout: float = typer.Option(10.0, help="Per-request timeout in seconds (504)."),
    max_body_mb: float = typer.Option(20.0, help="Request body limit in MiB (413)."),
    max_pixels: int = typer.Option(40_000_000, help="Pixels per image limit (413)."),
    max_images: int = typer.Option(64, help="Images per request limit (413)."),
    threshold: float | None = typer.Option(None, help="Default 'unknown' threshold."),
    log_level: str = typer.Option("info", help="debug | info | warning"),
    max_connections: int | None = typer.Option(
        None, help="Open connections at once; beyond: 503 (default 4096; docs/serving.md)."
    ),
    header_timeout: float | None = typer.Option(
        None, help="Seconds for a request's head to arrive, else the connection closes (10)."
    ),
    body_timeout: float | None = typer.Option(
        None, help="Seconds for a body (plus 1 s per 256 KiB), else 408 (20)."
    ),
    max_in_flight_mb: float | None = typer.Option(
        None, help="MiB of request bodies held at once by all requests; beyond: 503 (256)."
    ),
) -> None:
    """Serve RUN over HTTP: POST /predict, GET /health, GET /model, docs at /docs."""
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise TransferlabError("--log-level takes debug, info, warning or error")
    try:
        from transferlab.serve import MB, run_server
    except ImportError as e:
        raise TransferlabError(
            f"serving needs FastAPI and uvicorn ({e.name} is missing): "
            "pip install 'transferlab[serve]'"
        ) from e

    run_server(
        run,
        host=host,
        port=port,
        log_level=log_level,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        timeout_s=timeout,
        max_body_bytes=int(max_body_mb * MB),
        max_pixels=max_pixels,
        max_images=max_images,
        threshold=threshold,
        **_given(
            max_connections=max_connections,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            max_in_flight_bytes=None if max_in_flight_mb is None else int(max_in_flight_mb * MB),
        ),
    )


def _given(**limits: Any) -> dict[str, Any]:
    """The limits set on the command line; the server's own defaults apply to the rest."""
    return {k: v for k, v in limits.items() if v is not None}
