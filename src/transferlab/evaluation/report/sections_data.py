"""What the run was: its dataset (counts, skipped files, leakage, samples) and its
configuration and environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.errors import TransferlabError
from transferlab.evaluation import plots
from transferlab.evaluation.report.context import RunContext
from transferlab.evaluation.report.render import THUMB_PX, thumbnail_uri
from transferlab.system import library_versions

_MAX_THUMB_CLASSES = 40
_MAX_LISTED = 100  # skipped files and duplicates listed in full up to this many


def data_section(ctx: RunContext, n_thumbs: int) -> dict[str, Any]:
    """The ``data.html`` section: images per class and split, skipped files, leakage."""
    s = ctx.summary
    counts: dict[str, dict[str, int]] = s.get("counts") or {}
    if not counts:
        raise TransferlabError("the run has no data.json (it was fitted without a run folder?)")
    splits = list(counts)
    idx = s.get("index", {})
    dups = s.get("cross_split_duplicates") or []
    return {
        "root": idx.get("root", "?"),
        "layout": idx.get("layout", "?"),
        "generated_split": bool(idx.get("generated_split")),
        "splits": splits,
        "rows": [
            (
                c,
                *(counts[sp].get(c, 0) for sp in splits),
                sum(counts[sp].get(c, 0) for sp in splits),
            )
            for c in ctx.classes
        ],
        "totals": [sum(counts[sp].values()) for sp in splits],
        "total": sum(sum(v.values()) for v in counts.values()),
        "counts_png": ctx.figure(plots.plot_class_counts, counts),
        "problems": idx.get("problems", []),
        "skipped": skipped_files("Skipped files", s.get("skipped") or []),
        "n_dups": len(dups),
        "dups": dups[:_MAX_LISTED],
        "given": _given_data(ctx) if ctx.data is not None else None,
        "thumbs": _thumbnail_grid(ctx, n_thumbs) if n_thumbs > 0 else None,
    }


def skipped_files(title: str, skipped: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    return {
        "title": title,
        "n": len(skipped),
        "rows": [(x["path"], x["reason"]) for x in skipped[:_MAX_LISTED]],
        "more": max(0, len(skipped) - _MAX_LISTED),
    }


def _given_data(ctx: RunContext) -> dict[str, Any] | None:
    """The folder given with ``data``: what the sections below scored, and what was skipped."""
    prepared = ctx.prepared()
    if prepared is None:
        return None
    root = prepared.index.root
    return {
        "root": root,
        "counts": ", ".join(f"{n} {len(sp)}" for n, sp in prepared.splits.items()),
        "skipped": skipped_files(f"Skipped files in {root}", prepared.summary()["skipped"]),
    }


def _thumbnail_grid(ctx: RunContext, n: int) -> dict[str, Any] | None:
    sp = ctx.resolve(("train",), digests=False).get("train")
    if sp is None:
        return None
    rng = np.random.default_rng(0)  # the same samples every time the report is rebuilt
    # Many classes: fewer samples each, and at most _MAX_THUMB_CLASSES classes, so that the
    # report stays a few MB and builds in seconds on 1000-class data too.
    n = min(n, max(2, 120 // max(1, len(ctx.classes))))
    classes = []
    for ci, c in enumerate(ctx.classes[:_MAX_THUMB_CLASSES]):
        members = np.flatnonzero(sp.labels == ci)
        pick = rng.choice(members, size=min(n, len(members)), replace=False) if len(members) else []
        paths = [sp.paths[i] for i in sorted(pick)]
        classes.append(
            (c, [{"src": thumbnail_uri(p, THUMB_PX), "alt": Path(p).name} for p in paths])
        )
    return {
        "n_classes": len(ctx.classes),
        "max_classes": _MAX_THUMB_CLASSES,
        "classes": classes,
    }


def config_section(ctx: RunContext) -> dict[str, Any]:
    """The ``config.html`` section: the settings that matter, library versions, timings."""
    saved = ctx.clf.saved
    timings = ctx.metrics.get("timings") or {}
    trained_v = saved.versions or {}
    now_v = library_versions()
    return {
        "key": _key_settings(ctx, timings),
        "versions": [
            (k, trained_v.get(k, "–"), now_v.get(k, "–"))
            for k in sorted(set(trained_v) | set(now_v))
        ],
        "config": sorted(saved.config.items()),
        "timings": [(k, f"{v:.2f} s") for k, v in timings.items() if isinstance(v, int | float)]
        if timings
        else None,
    }


def _key_settings(ctx: RunContext, timings: Mapping[str, Any]) -> list[tuple[str, Any]]:
    saved = ctx.clf.saved
    cfg, head, pre = saved.config, saved.head, saved.preprocess
    t = saved.temperature
    key: list[tuple[str, Any]] = [
        ("backbone", saved.body.get("spec")),
        ("pretrained", cfg.get("pretrained")),
        ("body trained", bool(saved.body.get("trained", False))),
        ("strategy", saved.strategy),
        ("head", head.get("kind")),
        ("seed", cfg.get("seed")),
        (
            "input",
            f"{pre.input_size[0]}×{pre.input_size[1]}, {pre.interpolation}, crop {pre.crop_pct:g}",
        ),
        ("temperature", f"{t:.3f}" + (" (calibrated)" if t != 1.0 else "")),
    ]
    if head.get("kind") == "linear" and "l2" in head:
        key.append((f"L2 (selected on {head.get('l2_source', '?')})", f"{head['l2']:.3g}"))
    info = ctx.metrics.get("info") or {}
    key += [
        (k.replace("_", " "), info[k])
        for k in ("trainable_params", "epochs", "best_epoch")
        if k in info
    ]
    if "total_s" in timings:
        key.append(("fit time", f"{timings['total_s']:.1f} s"))
    return key
