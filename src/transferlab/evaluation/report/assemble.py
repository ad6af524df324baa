"""The report of one run (or of a ladder and its best rung): each section computed and
rendered on its own, then laid out in one page."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transferlab.api import Classifier
from transferlab.data.prepared import PreparedData
from transferlab.errors import TransferlabError
from transferlab.evaluation import analysis
from transferlab.evaluation.report.context import RunContext, Sections
from transferlab.evaluation.report.render import render
from transferlab.evaluation.report.rungs import best_rung_dir, load_ladder
from transferlab.evaluation.report.sections_auto import auto_section
from transferlab.evaluation.report.sections_cams import gradcam_section
from transferlab.evaluation.report.sections_curve import curve_report_section
from transferlab.evaluation.report.sections_data import config_section, data_section
from transferlab.evaluation.report.sections_errors import suspects_section, top_losses_section
from transferlab.evaluation.report.sections_ladder import ladder_section
from transferlab.evaluation.report.sections_metrics import (
    calibration_section,
    confusion_section,
    curves_section,
    metrics_section,
)
from transferlab.evaluation.run_data import fitted_on
from transferlab.progress import info, warn
from transferlab.runs import AUTO_FILE, LADDER_FILE, MODEL_FILE, REPORT_FILE, is_run_dir
from transferlab.storage import atomic_write_text


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    ladder: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    curve: str | os.PathLike[str] | None = None,
    gradcam: int = 4,
    top_k: int = 12,
    thumbnails: int = 6,
    suspects: bool | None = None,
    write_predictions: bool = True,
    classifier: Classifier | None = None,
    prepared: PreparedData | None = None,
) -> Path:
    """Write a self-contained HTML report for a run folder and return its path.

    ``run_dir`` is a ``fit`` run folder, or a ladder folder holding ``ladder.json`` (its best
    rung by val accuracy, :func:`best_rung`, is then detailed). ``data`` re-locates the
    dataset when it moved (default: the paths in the run's ``data.json``). ``out`` defaults to
    ``run_dir/report.html``. ``ladder`` (a ``ladder.json`` path/folder or its dict) adds the
    comparison chart, table and McNemar tests against the best rung; ``curve`` (a folder that
    ``transferlab curve`` wrote) the learning curve and its power law. ``gradcam`` / ``top_k`` /
    ``thumbnails`` size the galleries; ``suspects`` lists training images whose label an
    out-of-fold head disputes (default: only for runs with an unchanged pretrained body,
    whose training features are cached; searched on a bounded sample). With
    ``write_predictions`` the per-image val/test predictions go to ``run_dir/predictions.csv``
    (used by ``compare_runs``). ``classifier``: the run's model already in memory (``fit``
    passes its own: saves reloading the body and reuses its feature runtime). ``data`` is
    scanned as ``fit`` scans (unusable files are skipped and listed in the Dataset section);
    ``prepared``: that scan when the caller already has it
    (:func:`transferlab.evaluation.run_data.prepare_run_data` of ``data``). Prints the build
    time and size.
    """
    t0 = time.perf_counter()
    out_path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    run, lad, classifier = _detailed_run(Path(run_dir), ladder, classifier)
    ctx = RunContext(run, data, classifier, prepared)
    if suspects is None:
        suspects = not ctx.clf.saved.body.get("trained", False)
    sections = _sections(
        ctx,
        lad,
        curve,
        gradcam=gradcam,
        top_k=top_k,
        thumbnails=thumbnails,
        suspects=suspects,
    )
    if write_predictions and _same_data(ctx) and ctx.logits:
        _save_predictions(ctx, sections)
    doc = _page(ctx, sections, lad, time.perf_counter() - t0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, doc)
    mb = out_path.stat().st_size / 1e6
    info(f"report: {out_path} ({mb:.2f} MB, built in {time.perf_counter() - t0:.1f} s)")
    for problem in sections.unavailable:
        info(f"  [yellow]report section unavailable[/yellow] {problem}")
    return out_path


def _detailed_run(
    run: Path,
    ladder: str | os.PathLike[str] | Mapping[str, Any] | None,
    classifier: Classifier | None,
) -> tuple[Path, dict[str, Any] | None, Classifier | None]:
    """The run folder the report details (a ladder folder's best rung), its ladder if any,
    and the caller's model when it belongs to that folder."""
    lad = load_ladder(ladder) if ladder is not None else None
    if lad is None and (run / LADDER_FILE).is_file():
        lad = load_ladder(run)
    if is_run_dir(run):
        return run, lad, classifier
    best = best_rung_dir(lad) if lad is not None else None
    if best is None:
        raise TransferlabError(f"{run}: not a transferlab run folder (no {MODEL_FILE})")
    return best, lad, None  # the caller's model belongs to the folder it gave, not this rung


def _sections(
    ctx: RunContext,
    lad: Mapping[str, Any] | None,
    curve: str | os.PathLike[str] | None,
    *,
    gradcam: int,
    top_k: int,
    thumbnails: int,
    suspects: bool,
) -> Sections:
    """Every section, in the page's order: each one computed, then rendered by its template."""
    plan: list[tuple[str, str, Callable[[], Mapping[str, Any]]]] = []
    if lad is not None:
        plan.append(("ladder", "Ladder: strategies compared", lambda: ladder_section(lad)))
    if curve is not None:
        title = "Learning curve: accuracy against images per class"
        plan.append(("curve", title, lambda: curve_report_section(curve)))
    if (ctx.run / AUTO_FILE).is_file():
        plan.append(("auto", "Auto: what was tried and why", lambda: auto_section(ctx)))
    plan += [
        ("data", "Dataset", lambda: data_section(ctx, thumbnails)),
        ("config", "Configuration and environment", lambda: config_section(ctx)),
        ("curves", "Learning curves", lambda: curves_section(ctx)),
        ("metrics", "Metrics (95% confidence intervals)", lambda: metrics_section(ctx)),
        ("confusion", "Confusion matrix", lambda: confusion_section(ctx)),
        ("calibration", "Calibration", lambda: calibration_section(ctx)),
        ("top-losses", "Most confidently wrong", lambda: top_losses_section(ctx, top_k)),
    ]
    if suspects:
        title = "Possible label errors (training set)"
        plan.append(("suspects", title, lambda: suspects_section(ctx, top_k)))
    if gradcam > 0:
        title = "Class activation maps: where the model looks"
        plan.append(("gradcam", title, lambda: gradcam_section(ctx, gradcam)))
    rep = Sections()
    for sid, title, build in plan:
        rep.add(sid, title, build)
    return rep


def _same_data(ctx: RunContext) -> bool:
    """The report scored the run's own images (no ``data``, or the folder it was fitted on)."""
    if ctx.data is None:
        return True
    try:
        return fitted_on(ctx.summary, ctx.data)
    except TransferlabError:  # data.json is corrupt: the Dataset section says so
        return False


def _save_predictions(ctx: RunContext, sections: Sections) -> None:
    """``predictions.csv`` of the images the sections scored.

    It describes the run's own test set (compare_runs pairs runs on it): never overwrite it
    with another dataset's, and only when the sections could score the images."""
    try:
        splits = ctx.splits()
        analysis.save_predictions(
            ctx.run,
            {n: (splits[n], ctx.probs(n)) for n in ("val", "test") if n in splits},
            ctx.classes,
        )
    except (TransferlabError, OSError) as e:
        sections.unavailable.append(f"predictions.csv: {e}")


def _headline(ctx: RunContext) -> dict[str, Any] | None:
    try:
        metrics = ctx.metrics
    except TransferlabError:  # corrupt metrics.json: the Metrics section says so
        return None
    m = metrics.get("test") or metrics.get("val")
    return {"which": "test" if "test" in metrics else "val", "m": m} if m else None


def _page(
    ctx: RunContext, sections: Sections, lad: Mapping[str, Any] | None, seconds: float
) -> str:
    saved = ctx.clf.saved
    title = f"transferlab report: {ctx.run.name}"
    if lad is not None and lad.get("_dir"):
        title = f"transferlab ladder: {Path(lad['_dir']).name} (detailed: {ctx.run.name})"
    page = render(
        "page.html",
        title=title,
        headline=_headline(ctx),
        strategy=saved.strategy,
        backbone=saved.body.get("spec"),
        n_classes=len(ctx.classes),
        built=f"{_dt.datetime.now():%Y-%m-%d %H:%M}",
        sections=sections.built,
        seconds=seconds,
        run=ctx.run,
    )
    return f"{page}\n"


def write_report(run_dir: str | os.PathLike[str], **kwargs: Any) -> Path | None:
    """``build_report`` for callers that just trained something: a report problem becomes a
    one-line warning, because it must never fail (or lose) a finished training."""
    try:
        return build_report(run_dir, **kwargs)
    except TransferlabError as e:
        warn(f"no report.html in {run_dir}: {e}")
        return None
