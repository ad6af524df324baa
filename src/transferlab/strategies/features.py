"""The frozen pretrained base as a feature extractor: cached bottleneck features + a small head.

The base runs once per image ever (the cache is keyed by content + backbone + preprocessing);
fitting a head on 1,000 cached 1280-d vectors takes a second, so trying another head, seed or
L2 strength costs nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import numpy as np
from torch import nn

from transferlab.backbones import Backbone
from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.extract import extraction_stats
from transferlab.heads import FittedHead, fit_head
from transferlab.heads.remember import features_digest, head_key, keep_head, recall_head
from transferlab.model import ClassifierNet, LazyNet, softmax
from transferlab.progress import progress
from transferlab.strategies.base import StrategyContext, StrategyResult, body_record


def split_features(ctx: StrategyContext, split: Split, name: str) -> np.ndarray:
    """Bottleneck features of one split, from the cache where possible."""
    _, ex = ctx.pretrained()
    with progress(len(split), f"features [{name}]") as advance:
        got = ex(split.paths, split.digests, on_progress=advance)
    if got.failures:
        # The scan already decoded every file; a failure here means the file changed since.
        path, reason = got.failures[0]
        raise TransferlabError(f"{path}: {reason} (the file changed during the run?)")
    ctx.timings[f"extract_{name}_s"] = got.stats["cache_read_s"] + got.stats["extract_s"]
    ctx.extract_stats.append(got.stats)
    return got.features


def fit_head_on_features(ctx: StrategyContext) -> tuple[FittedHead, dict[str, np.ndarray]]:
    """Phase 1 of every pretrained strategy: a head on cached features, plus val/test probs.

    A head already fitted on the same features, labels and options comes from the cache
    (``heads.remember``) after streamed passes over the cached features, which are then never
    held in memory whole."""
    recalled, digests = _recalled_head(ctx)
    if recalled is not None:
        return recalled
    cfg = ctx.config
    feats = {name: split_features(ctx, split, name) for name, split in _splits(ctx)}
    t0 = time.perf_counter()
    fitted = fit_head(
        cfg.head,
        feats["train"],
        ctx.train.labels,
        feats.get("val"),
        ctx.val.labels if "val" in feats else None,
        num_classes=len(ctx.classes),
        class_weight=cfg.class_weight,
        seed=cfg.seed,
    )
    ctx.timings["head_fit_s"] = time.perf_counter() - t0
    fitted.module.eval()
    for name in ("train", "val"):
        if name in feats and name not in digests:  # not streamed by _recalled_head: a miss
            digests[name] = features_digest([feats[name]])
    keep_head(ctx.pretrained()[1].cache.root, _head_key(ctx, digests), fitted)
    probs = {
        name: softmax(fitted.predict_logits(feats[name]))
        for name in ("val", "test")
        if name in feats
    }
    return fitted, probs


def _splits(ctx: StrategyContext) -> list[tuple[str, Split]]:
    named = (("train", ctx.train), ("val", ctx.val), ("test", ctx.test))
    return [(name, split) for name, split in named if split is not None and len(split)]


def _head_key(ctx: StrategyContext, digests: dict[str, str]) -> str:
    """What the head's bytes depend on: the features (digests), labels and fit arguments."""
    cfg = ctx.config
    labels = [s.labels.astype("<i8").tobytes() for name, s in _splits(ctx) if name in digests]
    return head_key(cfg.head, cfg.class_weight, cfg.seed, len(ctx.classes), digests, *labels)


class _Miss(Exception):
    """A feature is not in the cache: the head is fitted the ordinary way."""


def _recalled_head(
    ctx: StrategyContext,
) -> tuple[tuple[FittedHead, dict[str, np.ndarray]] | None, dict[str, str]]:
    """The kept head for these features and its val/test probs, or None when a training or
    validation feature or the head is not in the cache; and the feature digests it computed
    (all of them, when only the head was missing)."""
    t0 = time.perf_counter()
    splits = dict(_splits(ctx))
    recorded = len(ctx.extract_stats)  # a miss takes back what the passes recorded
    digests: dict[str, str] = {}
    try:
        for name in ("train", "val"):
            if name in splits:
                # val's progress line and record come from its second pass, below
                streamed = _streamed(ctx, splits[name], name, stats=name == "train")
                digests[name] = features_digest(streamed)
    except _Miss:
        fitted = None
    else:
        fitted = recall_head(ctx.pretrained()[1].cache.root, _head_key(ctx, digests))
    if fitted is None:
        del ctx.extract_stats[recorded:]
        return None, digests
    probs = {}
    for name in ("val", "test"):
        if name in splits:
            try:
                chunks = _streamed(ctx, splits[name], name)
                probs[name] = softmax(np.concatenate([fitted.predict_logits(c) for c in chunks]))
            except _Miss:  # an image the cache lacks (a test image added since): as usual
                probs[name] = softmax(
                    fitted.predict_logits(split_features(ctx, splits[name], name))
                )
    ctx.timings["head_fit_s"] = 0.0
    ctx.timings["head_recalled_s"] = time.perf_counter() - t0
    return (fitted, probs), digests


def _streamed(
    ctx: StrategyContext, split: Split, name: str, *, stats: bool = True
) -> Iterator[np.ndarray]:
    """``split``'s cached features a chunk at a time; with ``stats``, a progress line and the
    extraction record ``split_features`` makes (a second pass shows neither); raises _Miss at
    the first uncached image. Its line says "cached": when the head must be fitted after all,
    split_features reads the split again under its own line."""
    _, ex = ctx.pretrained()
    t0 = time.perf_counter()
    with progress(len(split) if stats else 0, f"cached features [{name}]") as advance:
        for chunk in ex.cached_chunks(split.digests):
            if chunk is None:
                raise _Miss
            yield chunk
            advance(len(chunk))
    if stats:
        seconds = time.perf_counter() - t0
        ctx.timings[f"extract_{name}_s"] = seconds
        ctx.extract_stats.append(extraction_stats(len(split), 0, 0, seconds))


def run(ctx: StrategyContext) -> StrategyResult:
    backbone, _ = ctx.pretrained()
    fitted, probs = fit_head_on_features(ctx)
    net: ClassifierNet | LazyNet
    if backbone.built or backbone.body_file is None:
        net = ClassifierNet(backbone.model, fitted.module).eval()
    else:  # every feature came from the cache: the body is built only if something runs it
        net = LazyNet(functools.partial(_model, backbone), fitted.module, backbone.body_file)
    return StrategyResult(
        net=net,
        preprocess=backbone.preprocess,
        body=body_record(backbone, frozen=True),
        head=fitted.spec,
        history=fitted.history,
        probs=probs,
        info={"trainable_params": sum(p.numel() for p in fitted.module.parameters())},
    )


def _model(backbone: Backbone) -> nn.Module:
    return backbone.model  # a function, not a lambda: a fitted model pickles (spawned ranks)
