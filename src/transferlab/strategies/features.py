"""The frozen pretrained base as a feature extractor: cached bottleneck features + a small head.

The base runs once per image ever (the cache is keyed by content + backbone + preprocessing);
fitting a head on 1,000 cached 1280-d vectors takes a second, so trying another head, seed or
L2 strength costs nothing.
"""

from __future__ import annotations

import time

import numpy as np

from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.heads import FittedHead, fit_head
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
    """Phase 1 of every pretrained strategy: a head on cached features, plus val/test probs."""
    cfg = ctx.config
    feats = {
        name: split_features(ctx, split, name)
        for name, split in (("train", ctx.train), ("val", ctx.val), ("test", ctx.test))
        if split is not None and len(split)
    }
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
    probs = {
        name: softmax(fitted.predict_logits(feats[name]))
        for name in ("val", "test")
        if name in feats
    }
    return fitted, probs


def run(ctx: StrategyContext) -> StrategyResult:
    backbone, _ = ctx.pretrained()
    fitted, probs = fit_head_on_features(ctx)
    net: ClassifierNet | LazyNet
    if backbone.built or backbone.body_file is None:
        net = ClassifierNet(backbone.model, fitted.module).eval()
    else:  # every feature came from the cache: the body is built only if something runs it
        net = LazyNet(lambda: backbone.model, fitted.module, backbone.body_file)
    return StrategyResult(
        net=net,
        preprocess=backbone.preprocess,
        body=body_record(backbone, frozen=True),
        head=fitted.spec,
        history=fitted.history,
        probs=probs,
        info={"trainable_params": sum(p.numel() for p in fitted.module.parameters())},
    )
