"""CLI commands for understanding a run: ``report``, ``compare``, and the work behind
``evaluate --tta/--calibrate/--report``.

``cli.py`` calls :func:`register` once to add the commands to its typer app, and its
``evaluate`` command hands the extra options to :func:`evaluate_run`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from transferlab.errors import TransferlabError

__all__ = ["TTA_MODES", "evaluate_run", "register"]

# stdout: the results users read or pipe. Progress, info and warnings go to stderr
# (transferlab.progress.console); nothing of this module prints anywhere else. Not cli.py's
# out_console: cli.py imports this module, and the console is the same kind either way.
out_console = Console(stderr=False)


def _say(line: str) -> None:
    """One result line on stdout, never wrapped (paths stay whole when piped) nor highlighted."""
    out_console.print(line, soft_wrap=True, highlight=False)


# --tta values: "flip" = image + mirror (2 views), "flip5crop" = 5 crops x mirror (10 views)
TTA_MODES = ("none", "flip", "flip5crop")
_SUMMARY_KEYS = ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "log_loss", "ece")


def _fmt_acc(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    lo, hi = m["accuracy_ci95"]
    return f"{m['accuracy']:.4f} [{lo:.4f}–{hi:.4f}] n={m['n']}"


def _update_metrics(run: Path, updates: dict[str, Any]) -> None:
    """Merge keys into the run's metrics.json (atomically: a crash leaves the old file)."""
    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(updates)
    from transferlab.storage import atomic_write_text  # torch: not at CLI start-up

    atomic_write_text(path, json.dumps(metrics, indent=2))


def _same_data(run: Path, data: str | os.PathLike[str]) -> bool:
    try:
        root = json.loads((run / "data.json").read_text())["index"]["root"]
    except (OSError, KeyError, ValueError):
        return False
    return Path(data).resolve() == Path(root).resolve()


def evaluate_run(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    split: str = "test",
    tta: str | bool | None = None,
    calibrate: bool = False,
    report_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a saved run on one split of ``data``, optionally with TTA, calibration, report.

    * ``calibrate``: fits the temperature on ``data``'s val split, stores it in the run's
      ``model.json`` (every later ``predict``/``serve``/export uses it) and records ECE and
      log-loss before/after for val and ``split`` under ``"calibration"`` in ``metrics.json``.
    * ``tta``: ``"flip"`` (or True) or ``"flip5crop"``; the split is also scored with
      test-time augmentation, and both results are recorded under ``"tta"``.
    * ``report_dir``: writes ``report_dir/report.html`` for this run and data.

    Returns ``{"split", "report" (classification report of the split with the model's final
    temperature), "calibration", "tta", "report_path"}`` and prints one line per extra.
    """
    import transferlab
    from transferlab.evaluation import analysis
    from transferlab.evaluation.metrics import classification_report

    run = Path(run)
    mode = {True: "flip", False: "none", None: "none"}.get(tta, tta)  # type: ignore[arg-type]
    if mode not in TTA_MODES:
        raise TransferlabError(f"--tta takes one of {', '.join(TTA_MODES)}; got {tta!r}")
    clf = transferlab.load(run)
    # scanned once, as fit scans: unusable files are skipped here and in the report alike
    prepared = analysis.prepare_run_data(data, clf.saved.config, clf.classes)
    if split not in prepared.splits:
        raise TransferlabError(
            f"{data}: no '{split}' split; available: {', '.join(prepared.splits)}"
        )
    target = prepared.splits[split]
    own_data = _same_data(run, data)
    logits = analysis.split_logits(clf, target)
    result: dict[str, Any] = {"split": split, "calibration": None, "tta": None}
    record: dict[str, Any] = {}

    if calibrate:
        val = prepared.splits.get("val")
        if val is None:
            raise TransferlabError(f"{data}: --calibrate needs a val split to fit the temperature")
        cal = analysis.calibrate(
            clf,
            val,
            test=target if split != "val" else None,
            test_logits=logits if split != "val" else None,
        )
        if split != "val":  # key the held-out numbers by the split's real name
            cal[split] = cal.pop("test")
        cal["data"] = str(data)
        clf.saved.save(run)  # model.json now carries the temperature
        record["calibration"] = cal
        result["calibration"] = cal
        t = cal["temperature"]
        c = cal[split] if split in cal else cal["val"]
        _say(
            f"temperature {t:.4f} (fitted on val, n={cal['n_val']}), stored in {run}/model.json; "
            f"{split} ECE {c['ece_before']:.4f} → {c['ece_after']:.4f}, "
            f"log loss {c['nll_before']:.4f} → {c['nll_after']:.4f}"
        )

    probs = analysis._softmax(logits, clf.saved.temperature)
    report = classification_report(target.labels, probs, clf.classes)
    result["report"] = report

    if mode != "none":
        tprobs = analysis.tta_probs(clf, target, flip=True, five_crop=mode == "flip5crop")
        trep = classification_report(target.labels, tprobs, clf.classes)
        info = {
            "split": split,
            "mode": mode,
            "views": 10 if mode == "flip5crop" else 2,
            "plain": {k: report[k] for k in _SUMMARY_KEYS},
            "tta": {k: trep[k] for k in _SUMMARY_KEYS},
            "data": str(data),
        }
        record["tta"] = info
        result["tta"] = info
        _say(
            f"{split} accuracy plain {_fmt_acc(info['plain'])} | TTA {mode} ({info['views']} "
            f"views) {_fmt_acc(info['tta'])}"
        )

    if record and own_data:
        # results on the run's own data become part of its record (and of its report)
        _update_metrics(run, record)
    result["report_path"] = None
    if report_dir is not None:
        from transferlab.evaluation.report import build_report

        path = build_report(
            run,
            data=data,
            out=Path(report_dir) / "report.html",
            classifier=clf,
            prepared=prepared,
        )
        result["report_path"] = str(path)
    return result


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
        _say(f"wrote {path}")

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
        _say(res["note"])
        if res["skipped"]:
            _say(f"skipped {len(res['skipped'])} unusable image(s) of {data} (in compare.json)")
        if res["chart"]:
            _say(f"chart: {res['chart']}")
        _say(f"wrote {Path(out) / 'compare.json'}")
