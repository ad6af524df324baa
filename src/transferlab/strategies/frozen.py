"""Frozen base + head trained on *augmented* images, served from a cache of augmented features.

Keras' transfer-learning guide rejects feature caching "because it doesn't allow you to
dynamically modify the input data ... required when doing data augmentation". A frozen base is a
fixed function, though: the features of an augmented view depend only on (image, backbone,
preprocessing, augmentation, the view's random draw). So each training image gets ``K`` augmented
views (default 5), each pushed through the base once, by the fastest feature runtime
(ONNX Runtime / OpenVINO where available), and cached in ``FeatureCache`` under the backbone
identity extended by ``aug=<preset>.v<N>|view=<k>|seed=<seed>`` and keyed by the image digest.
The head then trains for many epochs on those features, each epoch drawing one of the K views:
the base runs ``K`` times per image in total instead of once per image per epoch, and a second run
(another head, LR or seed for the head) runs it zero times. Validation and test use the plain
cached features of the ``features`` strategy.

Each view is seeded per image (``seed``, view index, image digest), so a view is the same picture
whichever batch, worker or run computes it, which is what makes it cacheable. ``info`` reports the
view extraction rate and the projected cost of running the base on every image in every epoch at
that rate.

Head: ``--head linear`` (standardisation + Linear) or ``mlp`` (the tutorial's 512-512 head),
AdamW (``--lr``, default 1e-3; ``--weight-decay``), cosine schedule, ``--label-smoothing``,
``--class-weight``, mini-batches of ``--batch-size``, early stopping on validation loss
(``--patience``) with the best epoch restored. Default augmentation ``light``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab.augment import build_transform, draft_size
from transferlab.data.dataset import ImageDataset, collate, raise_if_failed
from transferlab.data.prepared import Split
from transferlab.engine import HISTORY_CSV
from transferlab.heads import NUM_THREADS_DEFAULT, build_head, moments, torch_threads, train_epochs
from transferlab.model import ClassifierNet, softmax
from transferlab.progress import info, progress
from transferlab.strategies.base import StrategyContext, StrategyResult, body_record
from transferlab.strategies.features import split_features
from transferlab.training import cross_entropy, lr_factor, write_history

__all__ = [
    "VIEWS",
    "augmented_features",
    "run",
    "train_head",
]

VIEWS = 5
# epochs, lr and augmentation default per strategy: config.STRATEGY_DEFAULTS
_MLP = {"hidden": [512, 512], "dropout": 0.3}
# Part of every view's cache key: bump it when a preset's transforms change, so old views miss.
_VIEWS_VERSION = 1


class _SeededViews(ImageDataset):
    """``(uint8 view, index)``; the view's random draw is seeded by the image, not the batch."""

    def __init__(self, paths: list[str], seeds: list[int], ctx: StrategyContext, preset: str):
        pre = ctx.pretrained()[0].preprocess
        super().__init__(
            paths,
            np.arange(len(paths)),
            build_transform(preset, pre, train=True, normalize=False),
            ctx.config.max_pixels,
            draft=draft_size(pre),
            defer_errors=True,
        )
        self.seeds = seeds

    def item_seed(self, index: int) -> int:
        """The view's own seed: ImageDataset runs the transform on a private RNG stream seeded
        with it (the calling process's global RNG is untouched)."""
        return self.seeds[index]


def _view_seed(seed: int, view: int, digest: str) -> int:
    return int(np.random.SeedSequence([seed, view, int(digest[:15], 16)]).generate_state(1)[0])


def augmented_features(
    ctx: StrategyContext, split: Split, preset: str, views: int = VIEWS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of ``views`` augmented views of every image: ``(views, n, d)`` float32 + stats."""
    cfg = ctx.config
    _, ex = ctx.pretrained()
    identity = ex.backbone.identity()
    out = np.zeros((views, len(split), ex.backbone.num_features), dtype=np.float32)
    computed, seconds = 0, 0.0
    with torch.random.fork_rng(devices=[]), progress(views * len(split), "augmented views") as adv:
        for v in range(views):
            key = f"{identity}|aug={preset}.v{_VIEWS_VERSION}|view={v}|seed={cfg.seed}"
            store = ex.cache.namespace(key)
            hits = store.get_many(list(dict.fromkeys(split.digests)))
            misses = [i for i, d in enumerate(split.digests) if d not in hits]
            for i, d in enumerate(split.digests):
                if d in hits:
                    out[v, i] = hits[d]
            adv(len(split) - len(misses))
            t0 = time.perf_counter()
            for rows, feats in _compute_views(ctx, split, misses, preset, v):
                out[v, rows] = feats
                store.put_many({split.digests[r]: f for r, f in zip(rows, feats, strict=True)})
                adv(len(rows))
            seconds += time.perf_counter() - t0
            computed += len(misses)
    stats = {
        "views": views,
        "computed": computed,
        "cached": views * len(split) - computed,
        "seconds": seconds,
        "images_per_s": computed / seconds if computed and seconds > 0 else None,
        "engine": ex.runtime.engine if computed else "cache",
    }
    return out, stats


def _compute_views(
    ctx: StrategyContext, split: Split, rows: list[int], preset: str, view: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    if not rows:
        return
    _, ex = ctx.pretrained()
    seeds = [_view_seed(ctx.config.seed, view, split.digests[i]) for i in rows]
    ds = _SeededViews([split.paths[i] for i in rows], seeds, ctx, preset)
    workers = ctx.config.workers if ctx.config.workers is not None else 1
    loader = DataLoader(
        ds, batch_size=ctx.config.batch_size, num_workers=workers, collate_fn=collate
    )
    for batch in loader:
        raise_if_failed(batch)
        images, idx = batch
        yield [rows[int(j)] for j in idx], ex.runtime(images.numpy())


def _head_spec(kind: str, d: int, c: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind, "in_features": d, "num_classes": c, "standardize": True}
    if kind == "mlp":
        spec.update(_MLP)
    return spec


def train_head(
    views: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    ctx: StrategyContext,
) -> tuple[nn.Module, dict[str, Any], list[dict]]:
    """Train a head on cached views, one random view per image per epoch; best epoch restored."""
    cfg = ctx.config
    k, n, d = views.shape
    spec = _head_spec(cfg.head, d, len(ctx.classes))
    mean, std = moments(views.reshape(-1, d))  # in chunks: no float64 copy of the K views
    with torch.random.fork_rng(devices=[]), torch_threads(NUM_THREADS_DEFAULT):
        torch.manual_seed(cfg.seed)
        head = build_head(spec)
        head.standardize.mean.copy_(torch.from_numpy(mean).float())
        head.standardize.std.copy_(torch.from_numpy(np.maximum(std, 1e-6)).float())
        history, best = _fit(head, views, y, x_val, y_val, ctx)
    if best is not None:
        head.load_state_dict(best)
    spec.update(views=k, epochs_run=len(history))
    return head.eval(), spec, history


def _fit(
    head: nn.Module,
    views: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    ctx: StrategyContext,
) -> tuple[list[dict], dict[str, torch.Tensor] | None]:
    cfg = ctx.config
    k, n, _ = views.shape
    epochs = cfg.resolved("epochs")
    steps = math.ceil(n / cfg.batch_size)
    warmup = round(cfg.warmup_epochs * steps)
    # the whole head is trained (its standardization buffers are not parameters), so each batch
    # is standardized as drawn and the K views are never copied
    feats = torch.from_numpy(views)
    lr = cfg.resolved("lr")
    groups = [{"params": list(head.net.parameters()), "base_lr": lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def one_view_per_image() -> torch.Tensor:
        return feats[torch.randint(k, (n,), generator=gen), torch.arange(n)]

    history, best, _ = train_epochs(
        head,
        one_view_per_image,
        torch.from_numpy(y.astype(np.int64)),
        cross_entropy(y, len(ctx.classes), cfg),
        opt,
        batch_size=cfg.batch_size,
        max_epochs=epochs,
        generator=gen,
        validate=None if x_val is None else lambda: _evaluate(head, x_val, y_val),
        patience=cfg.patience,
        snapshot=head,
        lr_at=lambda step: lr_factor(cfg.schedule, step, epochs * steps, warmup),
        stage="head",
        timed=True,
    )
    return history, best


@torch.inference_mode()
def _evaluate(head: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    head.eval()
    logits = head(torch.from_numpy(x))
    target = torch.from_numpy(y.astype(np.int64))
    loss = float(nn.functional.cross_entropy(logits, target))
    return loss, float((logits.argmax(1) == target).float().mean())


def run(ctx: StrategyContext) -> StrategyResult:
    cfg = ctx.config
    backbone, _ = ctx.pretrained()
    preset = cfg.resolved("augment")
    views, stats = augmented_features(ctx, ctx.train, preset)
    ctx.timings["augmented_views_s"] = stats["seconds"]
    clean = {
        name: split_features(ctx, split, name)
        for name, split in (("val", ctx.val), ("test", ctx.test))
        if split is not None and len(split)
    }
    t0 = time.perf_counter()
    head, spec, history = train_head(
        views, ctx.train.labels, clean.get("val"), ctx.val.labels if "val" in clean else None, ctx
    )
    head_s = time.perf_counter() - t0
    ctx.timings["head_train_s"] = head_s
    with torch.inference_mode():
        probs = {name: softmax(head(torch.from_numpy(x)).numpy()) for name, x in clean.items()}
    if str(ctx.out) != os.devnull:
        ctx.out.mkdir(parents=True, exist_ok=True)
        write_history(ctx.out / HISTORY_CSV, history)
    rate = stats["images_per_s"]
    online_s = len(history) * len(ctx.train) / rate if rate else None
    info(
        f"frozen: {stats['views']} views/image ({stats['computed']} computed, "
        f"{stats['cached']} cached), head {len(history)} epochs in {head_s:.1f} s"
        + (f"; running the base every epoch would cost ~{online_s:.0f} s" if online_s else "")
    )
    return StrategyResult(
        net=ClassifierNet(backbone.model, head).eval(),
        preprocess=backbone.preprocess,
        body=body_record(backbone, frozen=True),
        head=spec,
        history=history,
        probs=probs,
        info={
            "augment": preset,
            "views": stats,
            "head_train_s": head_s,
            "epochs": len(history),
            "trainable_params": sum(p.numel() for p in head.parameters()),
            "online_base_estimate_s": online_s,
        },
    )
