"""Learning curve: accuracy against images per class, per rung, and what more data would buy.

The train split is cut to ``n`` images per class (seeded; for one seed the subsets are nested:
the 10-image subset is inside the 25-image one), val and test stay whole, and every
(rung × size × seed) is one ``fit`` (the ladder's rungs, with its ``--quick`` budgets). Each
point: val/test accuracy with its 95% Wilson interval; each size: mean ± sd over seeds and a t
interval of that mean. Per rung, :mod:`transferlab.selection.powerlaw` fits ``error(n) = a ·
n^(−b) + c`` to the test error (val when there is no test) and estimates the images per class
that reach the target accuracies, flagged when that is an extrapolation.

A seed changes both the training and which images are drawn, so the spread over seeds is
what a user with another sample of ``n`` images per class would see. Writes ``curve.json``,
``curve.png`` and ``curve.html`` (one self-contained page) to ``out``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from transferlab.api import fit
from transferlab.config import FitConfig, config_from
from transferlab.data.prepared import PreparedData, Split, prepare_data
from transferlab.errors import TransferlabError
from transferlab.ladder import QUICK, RUNGS
from transferlab.progress import info, verbosity
from transferlab.selection.curve_output import CURVE_FILE, write_outputs
from transferlab.selection.output import check_study_folder
from transferlab.selection.powerlaw import PowerLaw, fit_power_law

__all__ = ["CurveResult", "curve", "nested_subset", "parse_sizes"]

ALL = "all"
DEFAULT_SIZES: tuple[int | str, ...] = (10, 25, 50, 100, ALL)
DEFAULT_RUNGS = ("scratch-basic", "features-linear", "finetune-aug")
DEFAULT_TARGETS = (0.9, 0.95, 0.98)
# --quick: three seeds → two, five sizes → four, and the ladder's quick epochs per rung.
QUICK_SIZES: tuple[int | str, ...] = (10, 25, 50, ALL)
QUICK_SEEDS = 2


@dataclass
class CurveResult:
    """``curve``'s answer: ``report`` (what curve.json holds) and each rung's fitted law."""

    report: dict[str, Any]
    laws: dict[str, PowerLaw | None]

    def images_per_class_for(self, rung: str, accuracy: float) -> dict[str, Any] | None:
        """Images per class that ``rung`` needs for ``accuracy``: estimate, 95% interval,
        ``extrapolated``; None when the rung had too few sizes for a law."""
        if rung not in self.laws:
            raise TransferlabError(f"no rung {rung!r} in this curve; it has {', '.join(self.laws)}")
        law = self.laws[rung]
        return None if law is None else law.images_per_class_for(accuracy)

    def to_dict(self) -> dict[str, Any]:
        return self.report


def parse_sizes(text: str) -> list[int | str]:
    """``"10,25,all"`` → ``[10, 25, "all"]``, or an error naming ``--per-class``."""
    sizes: list[int | str] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part == ALL:
            sizes.append(ALL)
        elif part.isdigit() and int(part) >= 1:
            sizes.append(int(part))
        else:
            raise TransferlabError(
                f"--per-class {text!r}: give comma-separated counts >= 1 or 'all', e.g. 10,25,all"
            )
    if not sizes:
        raise TransferlabError("--per-class is empty; e.g. 10,25,50,100,all")
    return sizes


def nested_subset(split: Split, n_per_class: int | None, seed: int) -> Split:
    """``n_per_class`` images of each class (all of a smaller class; None: everything), drawn in
    one seeded order per class so a smaller subset is a prefix of a larger one."""
    if n_per_class is None:
        return split
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(split.labels):
        keep += rng.permutation(np.flatnonzero(split.labels == c))[:n_per_class].tolist()
    keep.sort()
    return Split(
        paths=[split.paths[i] for i in keep],
        labels=split.labels[keep],
        digests=[split.digests[i] for i in keep],
    )


def curve(
    data: str | os.PathLike,
    *,
    out: str | os.PathLike,
    per_class: Sequence[int | str] | None = None,
    rungs: Sequence[str] | None = None,
    seeds: int | None = None,
    quick: bool = False,
    targets: Sequence[float] = DEFAULT_TARGETS,
    overwrite: bool = False,
    config: FitConfig | None = None,
    verbose: bool | None = None,
    **options: Any,
) -> CurveResult:
    """Accuracy vs images per class for each rung (see the module docstring).

    ``per_class``: counts and/or ``"all"`` (default 10, 25, 50, 100, all; quick: 10, 25, 50,
    all); ``rungs``: ladder rung names (default scratch-basic, features-linear, finetune-aug);
    ``seeds`` (default 3; quick: 2); ``targets``: accuracies to estimate the data needed for.
    ``options``: ``FitConfig`` fields (backbone, cache_dir, workers, seed, …).
    """
    base = config or config_from(options).validate(cli=False)
    names = list(rungs or DEFAULT_RUNGS)
    _check_rungs(names)
    n_seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else 3)
    if n_seeds < 1:
        raise TransferlabError("--seeds must be at least 1")
    if not all(0 < t < 1 for t in targets):
        raise TransferlabError(f"--targets {list(targets)}: give accuracies between 0 and 1")
    check_study_folder(out, CURVE_FILE, overwrite=overwrite, command="curve")
    with verbosity(verbose):
        t0 = time.perf_counter()
        prepared = prepare_data(data, base)
        sizes = _resolve_sizes(per_class or (QUICK_SIZES if quick else DEFAULT_SIZES), prepared)
        runs = [_run_rung(name, data, prepared, base, sizes, n_seeds, quick) for name in names]
        laws = {r["name"]: _law(r, _eval_split(prepared), base.seed) for r in runs}
        for r in runs:
            law = laws[r["name"]]
            r["power_law"] = None if law is None else law.to_dict(tuple(targets))
        report = {
            "data": str(data), "backbone": base.backbone, "quick": quick,
            "seeds": [base.seed + k for k in range(n_seeds)],
            "per_class": [ALL if s is None else s for s in sizes],
            "train_per_class": _class_counts(prepared.splits["train"], prepared.classes),
            "eval_split": _eval_split(prepared), "targets": list(targets),
            "rungs": runs, "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        write_outputs(report, Path(out), laws)
    return CurveResult(report=report, laws=laws)


def _check_rungs(names: list[str]) -> None:
    unknown = [n for n in names if n not in RUNGS]
    if unknown or not names:
        raise TransferlabError(
            f"unknown rung(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(RUNGS)}"
        )


def _resolve_sizes(wanted: Sequence[int | str], prepared: PreparedData) -> list[int | None]:
    """Sorted, de-duplicated per-class counts; None = the whole train split. A count that
    takes every image of every class is the whole split too."""
    largest = int(np.bincount(prepared.splits["train"].labels).max())
    sizes: set[int | None] = set()
    for s in wanted:
        if s == ALL or (isinstance(s, int) and s >= largest):
            sizes.add(None)
        elif isinstance(s, int) and not isinstance(s, bool) and s >= 1:
            sizes.add(s)
        else:
            raise TransferlabError(f"per_class: {s!r} is not a count >= 1 or 'all'")
    return sorted(sizes, key=lambda s: float("inf") if s is None else s)


def _eval_split(prepared: PreparedData) -> str:
    return "test" if "test" in prepared.splits else "val"


def _class_counts(split: Split, classes: list[str]) -> dict[str, int]:
    return {c: int((split.labels == i).sum()) for i, c in enumerate(classes)}


def _run_rung(
    name: str, data: Any, prepared: PreparedData, base: FitConfig, sizes: list[int | None],
    n_seeds: int, quick: bool,
) -> dict[str, Any]:  # fmt: skip
    description, overrides = RUNGS[name]
    points = []
    # Largest first: the first fit of a pretrained rung extracts (and caches) every train image,
    # so each smaller subset's features are cache hits rather than a new runtime and a new pass.
    for size in reversed(sizes):
        runs = []
        for k in range(n_seeds):
            cfg = replace(base, **{**overrides, **(QUICK.get(name, {}) if quick else {})})
            cfg.seed, cfg.track = base.seed + k, None
            train = nested_subset(prepared.splits["train"], size, cfg.seed)
            sub = replace(prepared, splits={**prepared.splits, "train": train})
            info(f"[bold]{name}[/bold], {size or ALL} per class, seed {cfg.seed}")
            t0 = time.perf_counter()
            clf = fit(data, config=cfg, prepared=sub)
            runs.append(_record(clf.metrics, time.perf_counter() - t0, cfg.seed, train))
        points.insert(0, _point(size, runs, prepared))
    return {"name": name, "description": description, "config": overrides, "points": points}


def _record(metrics: dict[str, Any], seconds: float, seed: int, train: Split) -> dict[str, Any]:
    rec: dict[str, Any] = {"seed": seed, "seconds": seconds, "n_train": len(train)}
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            rec[split] = {"accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"],
                          "n": m["n"]}  # fmt: skip
    return rec


def _point(size: int | None, runs: list[dict[str, Any]], prepared: PreparedData) -> dict[str, Any]:
    """One size: its runs and, per split, mean ± sd over seeds with a t interval of the mean."""
    classes = len(prepared.classes)
    point: dict[str, Any] = {
        "per_class": ALL if size is None else size,
        "images_per_class": statistics.fmean(r["n_train"] for r in runs) / classes,
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "runs": runs,
    }
    for split in ("val", "test"):
        accs = [r[split]["accuracy"] for r in runs if split in r]
        if accs:
            point[split] = _across_seeds(accs)
    return point


def _across_seeds(accs: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(accs)
    if len(accs) < 2:
        return {"mean": mean, "sd": 0.0, "ci95": None, "seeds": 1}
    sd = statistics.stdev(accs)
    half = float(sps.t.ppf(0.975, len(accs) - 1)) * sd / len(accs) ** 0.5
    return {"mean": mean, "sd": sd, "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
            "seeds": len(accs)}  # fmt: skip


def _law(rung: dict[str, Any], split: str, seed: int) -> PowerLaw | None:
    points = rung["points"]
    sizes = np.array([p["images_per_class"] for p in points])
    errors = np.array([[1.0 - r[split]["accuracy"] for r in p["runs"]] for p in points])
    n_eval = int(points[0]["runs"][0][split]["n"])
    return fit_power_law(sizes, errors, n_eval, seed=seed)
