"""CLI commands that choose for the user: ``rank`` (which backbone) and ``curve`` (how much data).

``cli.py`` calls :func:`register` once to add them to its typer app. Each command calls the
Python API (``selection.rank``, ``learning_curve``) and prints a table. The ``FitConfig``
options they take are declared here with the field's own help text (:func:`_field`), not with
``cli.config_options``: importing ``cli`` from here would tie the two modules in a cycle.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.config import FitConfig
from transferlab.errors import TransferlabError
from transferlab.progress import out_console

__all__ = ["register"]

_HELP = {f.name: f.metadata.get("help", "") for f in fields(FitConfig)}
_DEFAULTS = FitConfig()


def _field(name: str) -> Any:
    """A typer option for the ``FitConfig`` field ``name``, with that field's default and help."""
    return typer.Option(getattr(_DEFAULTS, name), help=_HELP[name])


def register(app: typer.Typer) -> None:
    """Add ``rank`` and ``curve`` to the transferlab CLI app."""
    app.command("rank")(rank)
    app.command("curve")(curve)


def _csv(text: str, option: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise TransferlabError(f"{option} is empty; give comma-separated values")
    return items


def rank(
    data: Path = typer.Argument(..., help="Images (any layout `fit` accepts)."),
    backbones: str | None = typer.Option(
        None, "--backbones", "-b", help="Comma-separated candidates, as --backbone takes them."
    ),
    offline: bool = typer.Option(False, "--offline", help="Every backbone usable offline."),
    out: Path = typer.Option(Path("runs/rank"), "--out", "-o", help="Folder for rank.json/png."),
    folds: int = typer.Option(5, help="Stratified folds of the linear probe (train + val)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier rank in OUT."),
    seed: int = _field("seed"),
    cache_dir: str | None = _field("cache_dir"),
    engine: str = _field("engine"),
    batch_size: int = _field("batch_size"),
    workers: int | None = _field("workers"),
) -> None:
    """Which backbone to fit: LogME and a k-fold linear probe on train + val (never test)."""
    if (backbones is None) == (not offline):
        raise TransferlabError("give --backbones A,B,… or --offline (every local backbone)")
    from transferlab.selection.rank import rank as run_rank

    cfg = FitConfig(seed=seed, cache_dir=cache_dir, engine=engine, batch_size=batch_size,
                    workers=workers).validate()  # fmt: skip
    specs = _csv(backbones, "--backbones") if backbones else None
    result = run_rank(data, backbones=specs, out=out, folds=folds, overwrite=overwrite,
                      config=cfg)  # fmt: skip
    table = Table(title=f"backbones for {data}, best first (LogME; {folds}-fold CV on "
                  f"{result.candidates[0].n_rows} train+val images)")  # fmt: skip
    for col in ("#", "backbone", "LogME", "CV accuracy [95% CI]", "img/s", "dim", "params"):
        table.add_column(col, justify="left" if col == "backbone" else "right", overflow="fold")
    for i, c in enumerate(result.candidates, 1):
        lo, hi = c.cv_ci95
        table.add_row(str(i), c.backbone, f"{c.logme:.4f}", f"{c.cv_accuracy:.3f} [{lo:.3f}–"
                      f"{hi:.3f}]", f"{c.images_per_s:.0f}", str(c.feature_dim),
                      f"{c.params / 1e6:.1f}M")  # fmt: skip
    out_console.print(table)
    out_console.print(
        f"best: {result.best.backbone} — its features are cached, so `transferlab fit {data} "
        f"--backbone {result.best.backbone}` reuses them; written to {out}/ (rank.json, "
        f"rank.png) in {result.seconds:.0f} s",
        highlight=False, soft_wrap=True,
    )  # fmt: skip


def curve(
    data: Path = typer.Argument(..., help="Images (any layout `fit` accepts)."),
    out: Path = typer.Option(Path("runs/curve"), "--out", "-o", help="Folder for curve.*"),
    per_class: str | None = typer.Option(
        None, help="Train images per class, e.g. 10,25,50,100,all (quick: 10,25,50,all)."
    ),
    rungs: str | None = typer.Option(
        None, help="Ladder rungs (default scratch-basic,features-linear,finetune-aug)."
    ),
    seeds: int | None = typer.Option(None, help="Seeds per point: mean ± sd (default 3; quick 2)."),
    quick: bool = typer.Option(False, help="Fewer sizes, seeds and epochs: minutes on a CPU."),
    targets: str = typer.Option("0.9,0.95,0.98", help="Accuracies to estimate the data for."),
    overwrite: bool = typer.Option(False, help="Replace an earlier curve in OUT."),
    backbone: str = _field("backbone"),
    seed: int = _field("seed"),
    cache_dir: str | None = _field("cache_dir"),
    workers: int | None = _field("workers"),
) -> None:
    """Accuracy vs images per class per rung, and a power law: how much data a target needs."""
    from transferlab.learning_curve import curve as run_curve
    from transferlab.learning_curve import parse_sizes

    cfg = FitConfig(backbone=backbone, seed=seed, cache_dir=cache_dir, workers=workers).validate()
    try:
        goals = [float(t) for t in _csv(targets, "--targets")]
    except ValueError as e:
        raise TransferlabError(f"--targets takes comma-separated accuracies ({e})") from e
    result = run_curve(
        data, out=out, per_class=parse_sizes(per_class) if per_class else None,
        rungs=_csv(rungs, "--rungs") if rungs else None, seeds=seeds, quick=quick,
        targets=goals, overwrite=overwrite, config=cfg,
    )  # fmt: skip
    _print_curve(result.report)
    out_console.print(f"written to {out}/ (curve.json, curve.png, curve.html) in "
                      f"{result.report['seconds']:.0f} s")  # fmt: skip


def _print_curve(report: dict[str, Any]) -> None:
    split = report["eval_split"]
    table = Table(title=f"{split} accuracy, mean ± sd over {len(report['seeds'])} seed(s)")
    table.add_column("rung \\ per class")
    for s in report["per_class"]:
        table.add_column(str(s), justify="right")
    for rung in report["rungs"]:
        cells = [f"{p[split]['mean']:.3f} ± {p[split]['sd']:.3f}" if split in p else "–"
                 for p in rung["points"]]  # fmt: skip
        table.add_row(rung["name"], *cells)
    out_console.print(table)
    from transferlab.selection.curve_output import describe_estimate

    for rung in report["rungs"]:
        law = rung.get("power_law")
        if law is None:
            out_console.print(f"{rung['name']}: no power law (fewer than 3 sizes, or no errors)")
            continue
        for t in law["targets"]:
            out_console.print(f"{rung['name']}: {describe_estimate(t)}", highlight=False)
