"""``rank``: which pretrained backbone to fit, scored before training any of them.

For each candidate: the backbone and its extractor, built as ``fit`` builds them
(``strategies.strategy_context``), extract the train and val features through the normal
feature cache (so a later ``fit`` with that backbone reads them instead of running the network
again), then score them two ways on train + val only (the test split is never read):

- LogME (:mod:`.logme`): a training-free estimate of how well the features fit the labels;
- a stratified k-fold linear probe (:mod:`.probe`): the accuracy of the head ``fit`` trains,
  out of fold, with a 95% Wilson interval.

Also recorded: the extraction speed (a fixed probe of decode + forward on up to 96 train
images, so a cached backbone is timed like an uncached one), the feature dimension and the
parameter count. Candidates are sorted by LogME, best first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.backbones import list_backbones
from transferlab.config import FitConfig, config_from
from transferlab.data.loader import iter_decoded
from transferlab.data.prepared import PreparedData, prepare_data
from transferlab.errors import TransferlabError
from transferlab.extract import FeatureExtractor
from transferlab.progress import info, verbosity
from transferlab.selection.logme import logme
from transferlab.selection.output import RANK_FILE, RANK_PNG, check_study_folder, plot_rank
from transferlab.selection.probe import check_folds, cv_linear_probe
from transferlab.storage import write_json
from transferlab.strategies import strategy_context
from transferlab.strategies.features import split_features

__all__ = ["Candidate", "RankResult", "offline_backbones", "rank"]

_PROBE_IMAGES = 96  # three batches of 32: the first (pool start-up, warm-up) is not timed


@dataclass
class Candidate:
    """One backbone's scores on the dataset's train + val rows."""

    backbone: str
    logme: float
    cv_accuracy: float
    cv_ci95: tuple[float, float]
    cv_folds: int
    cv_l2: float  # the linear head's L2 strength, chosen as fit chooses it (see .probe)
    images_per_s: float
    feature_dim: int
    params: int
    n_rows: int
    extract_s: float  # this call's feature time (cache reads + any extraction)
    cache_hits: int
    score_s: float  # LogME + the k-fold probe


@dataclass
class RankResult:
    """``rank``'s answer: candidates best first (by LogME) and what they were scored on."""

    data: str
    classes: list[str]
    folds: int
    seed: int
    candidates: list[Candidate]
    seconds: float
    out: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["order"] = "logme, descending"
        return d

    def __repr__(self) -> str:
        rows = [
            f"  {c.backbone}: LogME {c.logme:.4f}, CV accuracy {c.cv_accuracy:.3f} "
            f"[{c.cv_ci95[0]:.3f}, {c.cv_ci95[1]:.3f}]"
            for c in self.candidates
        ]
        return f"RankResult({self.data}, best first)\n" + "\n".join(rows)


def offline_backbones() -> list[str]:
    """Every pretrained backbone usable without a network (``transferlab backbones --offline``)."""
    return [i.name for i in list_backbones() if i.offline and i.pretrained]


def rank(
    data: str | os.PathLike,
    *,
    backbones: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    folds: int = 5,
    overwrite: bool = False,
    config: FitConfig | None = None,
    prepared: PreparedData | None = None,
    verbose: bool | None = None,
    **options: Any,
) -> RankResult:
    """Score candidate backbones for ``data`` with LogME and a k-fold linear probe (module doc).

    ``backbones``: specs as ``fit`` takes them (default: every offline one). ``options``:
    ``FitConfig`` fields that matter here (``cache_dir``, ``engine``, ``workers``,
    ``batch_size``, ``seed``, the split fractions). With ``out``: ``rank.json`` and ``rank.png``.
    """
    cfg = config or config_from(options).validate(cli=False)
    specs = list(backbones) if backbones else offline_backbones()
    if not specs:
        raise TransferlabError(
            "no candidate backbones: pass --backbones A,B or add weights folders "
            "(transferlab backbones --add-weights-dir DIR)"
        )
    if out is not None:
        check_study_folder(out, RANK_FILE, overwrite=overwrite, command="rank")
    with verbosity(verbose):
        t0 = time.perf_counter()
        prepared = prepared or prepare_data(data, cfg)
        rows = [prepared.splits[n].labels for n in ("train", "val") if n in prepared.splits]
        # before any extraction
        check_folds(np.concatenate(rows), folds, len(prepared.classes), prepared.classes)
        scored = [_score(spec, prepared, cfg, folds) for spec in specs]
        scored.sort(key=lambda c: -c.logme)
        result = RankResult(
            data=str(data), classes=prepared.classes, folds=folds, seed=cfg.seed,
            candidates=scored, seconds=time.perf_counter() - t0, config=cfg.to_dict(),
        )  # fmt: skip
        if out is not None:
            _write(result, Path(out))
    return result


def _score(spec: str, prepared: PreparedData, cfg: FitConfig, folds: int) -> Candidate:
    """Features of train + val through the cache, then LogME and the probe on them."""
    info(f"[bold]{spec}[/bold]")
    # The backbone and extractor exactly as `fit --strategy features` builds them: same cache
    # namespace, so that fit finds these features.
    ctx = strategy_context(prepared, replace(cfg, backbone=spec, strategy="features"),
                           Path(os.devnull))  # fmt: skip
    backbone, extractor = ctx.pretrained()
    t0 = time.perf_counter()
    splits = [("train", ctx.train), ("val", ctx.val)]  # never ctx.test
    parts = [(split_features(ctx, s, n), s.labels) for n, s in splits if s is not None and len(s)]
    extract_s = time.perf_counter() - t0
    x = np.concatenate([f for f, _ in parts])
    y = np.concatenate([labels for _, labels in parts])
    t1 = time.perf_counter()
    score = logme(x, y).score
    probe = cv_linear_probe(x, y, num_classes=len(prepared.classes), folds=folds,
                            seed=cfg.seed, class_weight=cfg.class_weight)  # fmt: skip
    score_s = time.perf_counter() - t1
    cand = Candidate(
        backbone=backbone.spec, logme=score, cv_accuracy=probe.accuracy, cv_ci95=probe.ci95,
        cv_folds=probe.folds, cv_l2=probe.l2, feature_dim=int(x.shape[1]),
        images_per_s=_throughput(extractor, ctx.train.paths, cfg),
        params=sum(p.numel() for p in backbone.model.parameters()),
        n_rows=len(y), extract_s=extract_s, score_s=score_s,
        cache_hits=sum(s["cache_hits"] for s in ctx.extract_stats),
    )  # fmt: skip
    lo, hi = cand.cv_ci95
    info(f"  LogME {cand.logme:.4f}, CV accuracy {cand.cv_accuracy:.4f} [{lo:.4f}, {hi:.4f}], "
         f"{cand.images_per_s:.0f} img/s")  # fmt: skip
    return cand


def _throughput(extractor: FeatureExtractor, paths: Sequence[str], cfg: FitConfig) -> float:
    """Images per second of decode ‖ forward on the first train images, nothing cached."""
    runtime = extractor.runtime  # built (or its export loaded) before the clock starts
    batches = iter_decoded(list(paths[:_PROBE_IMAGES]), extractor.backbone.preprocess,
                           batch_size=cfg.batch_size, workers=cfg.workers,
                           max_pixels=cfg.max_pixels)  # fmt: skip
    t_start = time.perf_counter()
    t_first, first, done = t_start, 0, 0
    for i, batch in enumerate(batches):
        if len(batch.indices):
            runtime(batch.images)
        done += len(batch.indices)
        if i == 0:  # the first batch pays for the decode pool's start: timed only if alone
            t_first, first = time.perf_counter(), done
    t_end = time.perf_counter()
    if done > first:
        return (done - first) / max(t_end - t_first, 1e-9)
    return done / max(t_end - t_start, 1e-9)


def _write(result: RankResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.out = str(out)
    write_json(out / RANK_FILE, result.to_dict())
    plot_rank(result.to_dict(), out / RANK_PNG)
