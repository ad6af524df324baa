"""``fit --strategy auto --time-budget 10m``: the backbone and the recipe, chosen for this data
within a wall-clock budget, every choice made on train/val (never test).

1. **Rank** the candidates (``--backbone`` if given, else every offline weights folder): LogME +
   a k-fold linear probe on train + val (:mod:`.rank`); their features land in the cache.
2. **Features + linear head** on the best few by CV accuracy: seconds each, the features being
   cached; scored on val (on the CV accuracy when there is no val split).
3. **Fine-tune** the best of them when what is left of the budget covers the estimated cost
   (``--max-time`` caps it at what is left, less the ensemble's estimate); kept only when it
   beats its features head on val.
   The single model kept is the cheapest within one standard error of the best val accuracy
   (:func:`_parsimonious`): a faster backbone, then features over fine-tuning.
4. **Ensemble** the two best models (two backbones when there are two): the weighted average of
   their probabilities, weights chosen on val through the ensemble's own forward
   (:mod:`.ensemble`); tried when the budget left covers its estimated val + test passes, kept
   only when it beats the best single model on val (accuracy, then log loss), its own score
   cross-fitted on val (weights chosen on one half, scored on the other).

What was tried, what each scored and cost, and why the winner won go to ``auto.json`` in the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.augment import normalizer
from transferlab.backbones.identity import short_name
from transferlab.config import DEFAULT_BACKBONE, FitConfig
from transferlab.data.loader import iter_decoded
from transferlab.data.prepared import PreparedData, Split
from transferlab.model import ENSEMBLE
from transferlab.progress import info
from transferlab.selection.ensemble import ensemble_seconds, fit_ensemble
from transferlab.selection.rank import offline_backbones, rank
from transferlab.strategies import STRATEGIES, StrategyContext, StrategyResult, strategy_context

__all__ = ["AutoChoice", "fit_auto"]

HEADS_TRIED = 2  # features heads on the top candidates: cheap, and the CV ranking is noisy
FINETUNE_SHARE = 0.85  # of what is left for fine-tuning (evaluation and saving come after)
# Fine-tuning's throughput relative to extraction's (forward + backward on the top stages,
# augmented decode, measured ~1/4 on CPU), for the cost estimate before deciding to try it.
TRAIN_VS_EXTRACT = 0.25


@dataclass
class AutoChoice:
    """The winner (its strategy result and context, as fit continues with them) and the record."""

    result: StrategyResult
    ctx: StrategyContext
    record: dict[str, Any] = field(default_factory=dict)


def fit_auto(prepared: PreparedData, config: FitConfig, out: Path) -> AutoChoice:
    """Choose and train (module docstring); the budget counts from this call."""
    t0, budget = time.perf_counter(), config.budget_seconds()
    specs = [config.backbone] if config.backbone != DEFAULT_BACKBONE else _candidates()
    ranked = rank(prepared.index.root, backbones=specs, prepared=prepared, config=config)
    top = sorted(ranked.candidates, key=lambda c: -c.cv_accuracy)[:HEADS_TRIED]
    rates = {c.backbone: c.images_per_s for c in top}
    scored = []
    for cand in top:
        cfg = replace(config, strategy="features", backbone=cand.backbone)
        scored.append(_try(prepared, cfg, out, fallback=cand.cv_accuracy))
    tried = [row for _, row in scored]
    # Fine-tuning leaves the ensemble's estimated cost: it comes after, and is far cheaper.
    reserve = _ensemble_cost(prepared, _pair(scored), rates)
    _finetune(prepared, out, scored, tried, rates, budget - (time.perf_counter() - t0), reserve)
    winner, row = _parsimonious(scored, rates, len(prepared.splits.get("val") or ()))
    ensemble = _ensemble(prepared, scored, rates, budget - (time.perf_counter() - t0))
    tried.append(ensemble.row)
    if ensemble.choice is not None:
        winner, row = ensemble.choice, ensemble.row
    seconds = time.perf_counter() - t0
    winner.record = _record(config, budget, ranked.to_dict(), tried, row, seconds)
    winner.record["ensemble"] = ensemble.summary()
    info(f"auto: {row['strategy']} on {row['backbone']} (val accuracy {row['val_accuracy']:.4f}) "
         f"in {seconds:.0f} s of {budget:.0f}; auto.json says why")  # fmt: skip
    return winner


Scored = list[tuple[AutoChoice, dict[str, Any]]]


def _finetune(
    prepared: PreparedData,
    out: Path,
    scored: Scored,
    tried: list[dict[str, Any]],
    rates: dict[str, float],
    left: float,
    reserve: float,
) -> None:
    """Fine-tune the best features head's backbone when what is ``left`` of the budget, less
    the ``reserve`` kept for the ensemble, covers the estimate; the result joins ``scored``
    (and ``tried``), or the reason it was skipped joins ``tried``."""
    winner, row = max(scored, key=lambda pair: pair[1]["score"])
    estimate = _finetune_estimate(winner.ctx.config, prepared, rates[row["backbone"]])
    kept = f" (~{reserve:.0f} s of it kept for the ensemble)" if reserve else ""
    left -= reserve
    if prepared.splits.get("val") is None:
        tried.append({"strategy": "finetune", "skipped": "no val split to judge it on"})
    elif left < estimate:
        skipped = f"~{estimate:.0f} s, {left + reserve:.0f} s left{kept}"
        tried.append({"strategy": "finetune", "skipped": skipped})
    else:
        cfg = replace(winner.ctx.config, strategy="finetune", max_time=left * FINETUNE_SHARE)
        scored.append(_try(prepared, cfg, out, fallback=-math.inf))
        tried.append(scored[-1][1])


def _parsimonious(
    scored: Scored, rates: dict[str, float], n_val: int
) -> tuple[AutoChoice, dict[str, Any]]:
    """The cheapest model whose val accuracy is within one standard error of the best one's
    (the one-standard-error rule: Hastie, Tibshirani & Friedman, ESL 7.10): on a val split of a
    few hundred images a lead of one or two images is noise, and then the faster backbone, and
    of one backbone the features head over its fine-tuned network, gives the same expected
    accuracy for less. Without a val split (scores are CV accuracies), simply the best."""
    best = max(scored, key=lambda pair: pair[1]["score"])  # the first among equals
    if n_val == 0:
        return best
    top = best[1]["val_accuracy"]
    floor = top - math.sqrt(top * (1 - top) / n_val)
    tied = [pair for pair in scored if pair[1]["val_accuracy"] >= floor]
    cheapest = min(
        tied,
        key=lambda pair: (
            -rates.get(pair[1]["backbone"], 0.0),  # images per second: the faster first
            pair[1]["strategy"] != "features",
            tuple(-v for v in pair[1]["score"]),
        ),
    )
    if cheapest is not best:
        cheapest[1]["why"] = (
            f"val accuracy within one standard error ({top - floor:.4f}) of the best "
            f"({best[1]['strategy']} on {best[1]['backbone']}, {top:.4f}), and cheaper to run"
        )
    return cheapest


@dataclass
class _EnsembleStep:
    """The ensemble's row in ``tried``; ``choice``: the ensemble, when it is kept."""

    row: dict[str, Any]
    choice: AutoChoice | None = None

    def summary(self) -> dict[str, Any]:
        """auto.json's ``ensemble``: tried or not, kept or not, and why."""
        keys = ("backbone", "members", "weights", "val_accuracy", "val_log_loss", "cv_val_accuracy",
                "cv_val_log_loss", "seconds", "estimate_s", "reason", "skipped")  # fmt: skip
        return {
            "tried": "skipped" not in self.row,
            "kept": self.choice is not None,
            **{k: self.row[k] for k in keys if k in self.row},
        }


def _pair(scored: Scored) -> Scored:
    """The two best models (by val score), from two backbones when there are two."""
    ranked = sorted(scored, key=lambda pair: pair[1]["score"], reverse=True)  # stable
    if len(ranked) < 2:
        return ranked
    first = ranked[0]
    second = next((p for p in ranked[1:] if p[1]["backbone"] != first[1]["backbone"]), ranked[1])
    return [first, second]


def _ensemble_cost(prepared: PreparedData, pair: Scored, rates: dict[str, float]) -> float:
    """Seconds the ensemble's val pass and, if it is kept, fit's test pass would take."""
    if len(pair) < 2 or prepared.splits.get("val") is None:
        return 0.0
    images = sum(len(prepared.splits.get(name) or ()) for name in ("val", "test"))
    return ensemble_seconds(images, [rates[row["backbone"]] for _, row in pair])


def _ensemble(
    prepared: PreparedData, scored: Scored, rates: dict[str, float], left: float
) -> _EnsembleStep:
    """Try the ensemble of the two best models when there is a val split and the time for
    it; kept only when it beats the best single model on val (accuracy, then log loss)."""
    pair, val = _pair(scored), prepared.splits.get("val")
    row: dict[str, Any] = {"strategy": ENSEMBLE, "backbone": " + ".join(
        short_name(r["backbone"]) for _, r in pair)}  # fmt: skip
    estimate = _ensemble_cost(prepared, pair, rates)
    if len(pair) < 2:
        row["skipped"] = "one model only: nothing to ensemble"
    elif val is None:
        row["skipped"] = "no val split to choose the weights on"
    elif left < estimate:
        row["skipped"] = f"~{estimate:.0f} s, {left:.0f} s left"
    if "skipped" in row:
        return _EnsembleStep(row)
    t0 = time.perf_counter()
    members = [choice.result for choice, _ in pair]
    ens = fit_ensemble(members, [r["strategy"] for _, r in pair], val, pair[0][0].ctx.config)
    row.update(
        members=[f"{r['strategy']} on {short_name(r['backbone'])}" for _, r in pair],
        weights=ens.weights, val_accuracy=ens.val_accuracy, val_log_loss=ens.val_log_loss,
        cv_val_accuracy=ens.cv_accuracy, cv_val_log_loss=ens.cv_log_loss,
        seconds=time.perf_counter() - t0, estimate_s=estimate,
        score=(ens.cv_accuracy, -ens.cv_log_loss),  # weights fitted on val flatter it there
    )  # fmt: skip
    best = pair[0][1]
    vs = (f"cross-fitted val accuracy {ens.cv_accuracy:.4f} / log loss {ens.cv_log_loss:.4f} vs "
          f"{best['strategy']} on {short_name(best['backbone'])}'s {best['val_accuracy']:.4f} / "
          f"{best['val_log_loss']:.4f}")  # fmt: skip
    info(f"auto: ensemble {row['backbone']} (weights {ens.weights}): {vs}")
    if ens.result is None:
        row["reason"] = f"not kept: the val-optimal weights {ens.weights} leave a member out"
        return _EnsembleStep(row)
    if row["score"] <= best["score"]:
        row["reason"] = f"not kept: {vs}, not better"
        return _EnsembleStep(row)
    row["reason"] = f"kept: {vs}"
    return _EnsembleStep(row, AutoChoice(ens.result, pair[0][0].ctx))


def _candidates() -> list[str]:
    """Every offline weights folder (the default backbone first when it is one of them)."""
    found = offline_backbones()
    return sorted(found, key=lambda s: DEFAULT_BACKBONE not in s) or [DEFAULT_BACKBONE]


def _try(
    prepared: PreparedData, cfg: FitConfig, out: Path, *, fallback: float
) -> tuple[AutoChoice, dict[str, Any]]:
    """Train one (backbone, strategy) and score it on val: (accuracy, −log loss)."""
    t0 = time.perf_counter()
    ctx = strategy_context(prepared, cfg, out)
    result = STRATEGIES[cfg.strategy].run(ctx)
    val = prepared.splits.get("val")
    if val is None:  # judged by the ranking's out-of-fold accuracy
        acc, nll = fallback, math.nan
    else:
        probs = result.probs.get("val")
        probs = _net_probs(result, val, cfg, len(ctx.classes)) if probs is None else probs
        acc, nll = _accuracy_nll(probs, val.labels)
    row = {
        "strategy": cfg.strategy, "backbone": cfg.backbone, "val_accuracy": acc,
        "val_log_loss": nll, "seconds": time.perf_counter() - t0,
        "score": (acc, -nll if math.isfinite(nll) else 0.0),
    }  # fmt: skip
    info(f"auto: {cfg.strategy} on {cfg.backbone}: val accuracy {acc:.4f}, log loss {nll:.4f}")
    return AutoChoice(result, ctx), row


def _net_probs(result: StrategyResult, split: Split, cfg: FitConfig, classes: int) -> np.ndarray:
    """The trained network's probabilities on ``split`` (decoded as evaluation decodes; rows of
    images that fail to decode stay NaN and are left out of the score)."""
    net, norm = result.net.eval(), normalizer(result.preprocess)
    out = np.full((len(split), classes), np.nan)
    with torch.inference_mode():
        for batch in iter_decoded(split.paths, result.preprocess, batch_size=cfg.batch_size,
                                  workers=cfg.workers, max_pixels=cfg.max_pixels):  # fmt: skip
            if len(batch.indices):
                logits = net(norm(torch.from_numpy(batch.images)))
                out[batch.indices] = torch.softmax(logits, 1).numpy()
    return out


def _accuracy_nll(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    ok = ~np.isnan(probs).any(axis=1)
    p, y = probs[ok], labels[ok]
    acc = float((p.argmax(axis=1) == y).mean())
    nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    return acc, nll


def _finetune_estimate(config: FitConfig, prepared: PreparedData, extract_rate: float) -> float:
    """Seconds fine-tuning would take at the default epochs, from the measured extraction rate."""
    epochs = FitConfig(strategy="finetune").resolved("epochs") if config.epochs is None else (
        config.epochs)  # fmt: skip
    images = len(prepared.splits["train"]) + len(prepared.splits.get("val") or ())
    return epochs * images / max(extract_rate * TRAIN_VS_EXTRACT, 1e-9)


def _record(
    config: FitConfig,
    budget: float,
    ranking: dict[str, Any],
    tried: list[dict[str, Any]],
    chosen: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    def plain(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k != "score"}

    return {
        "time_budget_s": budget,
        "seconds": seconds,
        "ranking": ranking,
        "tried": [plain(r) for r in tried],
        "chosen": plain(chosen),
        "why": chosen.get(
            "why", "highest val accuracy, then lowest val log loss, among those tried (test unseen)"
        ),
        "config": {"strategy": "auto", "time_budget": config.time_budget},
    }
