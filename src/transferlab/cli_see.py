"""CLI commands for understanding a run: ``evaluate``, ``report``, ``compare``, ``explain``, and
the ``convolve`` teaching demo.

``cli.py`` calls :func:`register` once to add the commands to its typer app. Each command parses
its options, calls the Python API (``transferlab.api.evaluate_run``, ``evaluation.report``,
``evaluation.compare``) and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.config import TTA_MODES
from transferlab.errors import TransferlabError
from transferlab.progress import out_console, say

__all__ = ["register"]


def _fmt_acc(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    lo, hi = m["accuracy_ci95"]
    return f"{m['accuracy']:.4f} [{lo:.4f}–{hi:.4f}] n={m['n']}"


def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by `fit`, or an exported .onnx."),
    data: Path = typer.Argument(..., help="The dataset to evaluate on."),
    split: str = typer.Option("test", help="train | val | test | all"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics here."),
    tta: str = typer.Option("none", help="none | flip | flip5crop (test-time augmentation)."),
    calibrate: bool = typer.Option(False, help="Fit a temperature on val; store it in the model."),
    report_dir: Path | None = typer.Option(None, "--report", help="Write DIR/report.html."),
) -> None:
    """Accuracy with 95% CI, balanced accuracy, per-class P/R/F1, confusion matrix, ECE."""
    from transferlab.api import evaluate_run
    from transferlab.evaluation.metrics import format_report_table

    if tta not in TTA_MODES:
        raise TransferlabError(f"--tta takes one of {', '.join(TTA_MODES)}; got {tta!r}")
    if report_dir is not None and run.suffix.lower() == ".onnx":
        raise TransferlabError("--report needs the run folder (an exported file has no history)")
    res = evaluate_run(run, data, split=split, tta=tta, calibrate=calibrate)
    report, classes, split = res.report, res.classifier.classes, res.split
    _say_extras(report, split, run)
    if report_dir is not None:
        from transferlab.evaluation.report import build_report
        from transferlab.runs import REPORT_FILE

        out = Path(report_dir) / REPORT_FILE
        build_report(run, data=data, out=out, classifier=res.classifier, prepared=res.prepared)
    out_console.print(format_report_table(report, classes, title=split))
    table = Table(title="confusion matrix (rows: true)")
    table.add_column("")
    for c in classes:
        table.add_column(c, justify="right")
    for c, row in zip(classes, report["confusion_matrix"], strict=True):
        table.add_row(c, *map(str, row))
    out_console.print(table)
    say(_summary_line(report, split))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


def _summary_line(report: dict[str, Any], split: str) -> str:
    """Accuracy with its CI and the probability-quality numbers, on one greppable line."""
    line = f"{split} accuracy {_fmt_acc(report)} | log loss {report['log_loss']:.4f}"
    line += f" | ECE {report['ece']:.4f}"
    if report.get("roc_auc") is not None:
        line += f" | ROC-AUC {report['roc_auc']:.4f}"
    return line


def _say_extras(report: dict[str, Any], split: str, run: Path) -> None:
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


def register(app: typer.Typer) -> None:
    """Add ``evaluate``, ``report``, ``compare``, ``explain`` and ``convolve`` to the app."""
    app.command("evaluate")(evaluate)
    app.command("report")(report)
    app.command("compare")(compare)
    app.command("explain")(explain)
    app.command("convolve")(convolve)


def report(
    run: Path = typer.Argument(..., help="A run folder (or a ladder folder with ladder.json)."),
    data: Path | None = typer.Option(
        None, help="The dataset, if it moved since the run (default: paths in data.json)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default RUN/report.html)."
    ),
    ladder: Path | None = typer.Option(None, help="A ladder.json to add as a comparison."),
    curve: Path | None = typer.Option(
        None, help="A folder `transferlab curve` wrote: adds the learning curve."
    ),
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
        curve=curve,
        gradcam=gradcam,
        top_k=top_k,
        suspects=suspects,
    )
    say(f"wrote {path}")


def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run folders."),
    data: Path | None = typer.Option(
        None, help="Score every run on this dataset's test split (paired McNemar test)."
    ),
    out: Path = typer.Option(
        Path("runs/compare"), "--out", "-o", help="Folder for compare.json/.png."
    ),
) -> None:
    """Accuracy with 95% CIs per run, and McNemar's test when they share a test set."""
    from transferlab.evaluation.compare import compare_runs

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


def explain(
    run: Path = typer.Argument(..., help="A run folder written by `fit`."),
    images: list[str] = typer.Argument(..., help="Image files, folders (recursive) or globs."),
    out: Path = typer.Option(Path("explain"), "--out", "-o", help="Folder for the PNG files."),
    target_class: str | None = typer.Option(None, help="Class to explain (default: predicted)."),
    layer: str | None = typer.Option(
        None, help="Target layer name (default: the last stage at stride 16, e.g. 14x14)."
    ),
    method: str = typer.Option("hirescam", help="hirescam | gradcam"),
    maps: bool = typer.Option(True, help="Also feature maps, bottleneck vector and filters."),
) -> None:
    """Class activation maps (HiResCAM/Grad-CAM); feature maps; bottleneck; first-layer filters."""
    import transferlab
    from transferlab.evaluation.explain import explain_files
    from transferlab.predict.sources import iter_sources

    files = list(iter_sources(images))
    if not files:
        raise TransferlabError(f"{' '.join(images)}: no image files found")
    written = explain_files(
        transferlab.load(run), files, out,
        target_class=target_class, layer=layer, method=method, maps=maps,
    )  # fmt: skip
    for w in written:
        out_console.print(str(w))


def convolve(
    image: Path = typer.Argument(..., help="Any image."),
    kernel: str = typer.Option(
        "mean",
        help="mean | gaussian | sobel-x | sobel-y | sharpen | edge, or '1,0,-1;2,0,-2;1,0,-1'",
    ),
    out: Path = typer.Option(Path("convolution.png"), "--out", "-o"),
) -> None:
    """Teaching demo: apply a 3x3 kernel to an image; input, kernel and output side by side."""
    from transferlab.evaluation.explain import convolve_file

    out_console.print(str(convolve_file(image, kernel, out)))
