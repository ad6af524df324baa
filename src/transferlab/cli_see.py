"""CLI commands for understanding a run: ``report``, ``compare``, and the work behind
``evaluate --tta/--calibrate/--report``.

``cli.py`` calls :func:`register` once to add the commands to its typer app, and its
``evaluate`` command hands the extra options to :func:`evaluate_run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.progress import out_console, say

__all__ = ["evaluate_run", "register"]


def _fmt_acc(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    lo, hi = m["accuracy_ci95"]
    return f"{m['accuracy']:.4f} [{lo:.4f}–{hi:.4f}] n={m['n']}"


def evaluate_run(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    split: str = "test",
    tta: str | bool | None = None,
    calibrate: bool = False,
    report_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """``transferlab evaluate`` with its extras: :func:`transferlab.api.evaluate_run`, one line
    per extra, and ``report_dir/report.html`` when asked. Returns ``{"split", "report",
    "calibration", "tta", "report_path"}``."""
    from transferlab.api import evaluate_run as evaluate_saved_run

    res = evaluate_saved_run(run, data, split=split, tta=tta, calibrate=calibrate)
    report = res.report
    cal, info = report.get("calibration"), report.get("tta")
    if cal is not None:
        c = cal[split] if split in cal else cal["val"]
        say(
            f"temperature {cal['temperature']:.4f} (fitted on val, n={cal['n_val']}), stored in "
            f"{run}/model.json; {split} ECE {c['ece_before']:.4f} → {c['ece_after']:.4f}, "
            f"log loss {c['nll_before']:.4f} → {c['nll_after']:.4f}"
        )
    if info is not None:
        say(
            f"{split} accuracy plain {_fmt_acc(info['plain'])} | TTA {info['mode']} "
            f"({info['views']} views) {_fmt_acc(info['tta'])}"
        )
    report_path = None
    if report_dir is not None:
        from transferlab.evaluation.report import build_report
        from transferlab.runs import REPORT_FILE

        report_path = str(
            build_report(
                run,
                data=data,
                out=Path(report_dir) / REPORT_FILE,
                classifier=res.classifier,
                prepared=res.prepared,
            )
        )
    return {
        "split": split,
        "report": report,
        "calibration": cal,
        "tta": info,
        "report_path": report_path,
    }


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``compare`` to the transferlab CLI app."""

    @app.command()
    def report(
        run: Path = typer.Argument(..., help="A run folder (or a ladder folder with ladder.json)."),
        data: Path | None = typer.Option(
            None, help="The dataset, if it moved since the run (default: paths in data.json)."
        ),
        out: Path | None = typer.Option(None, help="HTML file to write (default RUN/report.html)."),
        ladder: Path | None = typer.Option(None, help="A ladder.json to add as a comparison."),
        gradcam: int = typer.Option(4, help="Test images explained with Grad-CAM (0: none)."),
        top_k: int = typer.Option(12, help="Images in the top-loss and suspect galleries."),
        suspects: bool | None = typer.Option(
            None, help="List training images whose label an out-of-fold head disputes."
        ),
    ) -> None:
        """One self-contained HTML page: data, curves, metrics with CIs, calibration, errors."""
        from transferlab.evaluation.report import build_report

        path = build_report(
            run,
            data=data,
            out=out,
            ladder=ladder,
            gradcam=gradcam,
            top_k=top_k,
            suspects=suspects,
        )
        say(f"wrote {path}")

    @app.command()
    def compare(
        runs: list[Path] = typer.Argument(..., help="Two or more run folders."),
        data: Path | None = typer.Option(
            None, help="Score every run on this dataset's test split (paired McNemar test)."
        ),
        out: Path = typer.Option(Path("runs/compare"), help="Folder for compare.json/.png."),
    ) -> None:
        """Accuracy with 95% CIs per run, and McNemar's test when they share a test set."""
        from transferlab.evaluation.analysis import compare_runs

        res = compare_runs(runs, data, out=out)
        table = Table(title="runs")
        for col in ("run", "strategy", "val accuracy [95% CI]", "test accuracy [95% CI]"):
            table.add_column(col)
        for r in res["runs"]:
            table.add_row(r["name"], str(r["strategy"]), _fmt_acc(r["val"]), _fmt_acc(r["test"]))
        out_console.print(table)
        if res["mcnemar"]:
            t = Table(title="McNemar's test (paired, same test images)")
            for col in ("A", "B", "only A right", "only B right", "p-value", "method"):
                t.add_column(col)
            for p in res["mcnemar"]:
                t.add_row(
                    p["a"],
                    p["b"],
                    str(p["only_a_correct"]),
                    str(p["only_b_correct"]),
                    f"{p['p_value']:.4g}",
                    p["method"],
                )
            out_console.print(t)
        say(res["note"])
        if res["skipped"]:
            say(f"skipped {len(res['skipped'])} unusable image(s) of {data} (in compare.json)")
        if res["chart"]:
            say(f"chart: {res['chart']}")
        say(f"wrote {Path(out) / 'compare.json'}")
