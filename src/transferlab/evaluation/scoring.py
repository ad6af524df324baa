"""Scoring a trained classifier on images: logits, probabilities, test-time augmentation and
temperature scaling — what ``Classifier.evaluate`` and every analysis build on. Which images
(a run's splits, or a folder) is :mod:`transferlab.evaluation.run_data`. The frozen-body
strategies get their features from the cache, so everything here costs seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferlab.config import TTA_MODES
from transferlab.data.loader import iter_decoded
from transferlab.data.prepared import PreparedData, Split
from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import (
    classification_report,
    expected_calibration_error,
    fit_temperature,
)
from transferlab.model import softmax

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "SUMMARY_KEYS", "calibrate", "evaluate_split", "head_logits", "split_features",
    "split_logits", "tta_probs",
]  # fmt: skip

SUMMARY_KEYS = ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "log_loss", "ece")
_EPS = 1e-15  # probability floor for -log p (a confident miss costs ~34.5, not inf)


def head_logits(classifier: Classifier, features: np.ndarray) -> np.ndarray:
    """The head's raw logits (no temperature) for bottleneck features ``(n, d)``."""
    head = classifier.saved.head_net.eval()  # the body is not needed (nor built)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return head(x).double().numpy()


def split_features(classifier: Classifier, split: Split) -> np.ndarray:
    """Bottleneck features of a split (from the feature cache where the body is unchanged)."""
    got = classifier.extractor()(split.paths, split.digests)
    if got.failures:
        path, reason = got.failures[0]
        raise TransferlabError(f"{path}: {reason}")
    return got.features


def split_logits(classifier: Classifier, split: Split, rows: int = 4096) -> np.ndarray:
    """Raw logits (before the model's temperature) for every image of a split.

    Cached features are read ``rows`` at a time and only their logits kept, so scoring a split
    holds one chunk of features, not the split's (at 1M images, val + test would be ~2 GiB); a
    chunk with an image the cache lacks is extracted."""
    ex = classifier.extractor()
    parts = []
    for start, features in zip(
        range(0, len(split.paths), rows), ex.cached_chunks(split.digests, rows), strict=True
    ):
        if features is None:
            rows_here = slice(start, start + rows)
            part = Split(split.paths[rows_here], split.labels[rows_here], split.digests[rows_here])
            features = split_features(classifier, part)
        parts.append(head_logits(classifier, features))
    if not parts:
        return np.zeros((0, len(classifier.classes)), dtype=np.float64)
    return np.concatenate(parts)


def _five_crops(images: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """Four corners and the centre of (n, 3, H, W) images, each ``size`` (h, w)."""
    h, w = size
    big_h, big_w = images.shape[2], images.shape[3]
    top, left = (big_h - h) // 2, (big_w - w) // 2
    offsets = [(0, 0), (0, big_w - w), (big_h - h, 0), (big_h - h, big_w - w), (top, left)]
    return [np.ascontiguousarray(images[:, :, y : y + h, x : x + w]) for y, x in offsets]


def tta_probs(
    classifier: Classifier,
    split: Split | Sequence[str],
    *,
    flip: bool = True,
    five_crop: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
) -> np.ndarray:
    """Class probabilities averaged over augmented views of each image.

    Views: the model's own eval crop and, with ``flip``, its horizontal mirror; with
    ``five_crop`` the image is resized to the preprocessing's pre-crop size and the four corner
    crops plus the centre crop are used instead of the single centre crop (x2 with ``flip``).
    Each view goes through the body's runtime and the head; probabilities (with the model's
    temperature) are averaged. Costs one body pass per view: features of flipped/cropped
    views are not cached.
    """
    paths = list(split.paths if isinstance(split, Split) else split)
    if not paths:
        raise TransferlabError("no images for test-time augmentation")
    pre = classifier.saved.preprocess
    decode_pre = replace(pre, input_size=pre.resize_size, crop_pct=1.0) if five_crop else pre
    ex = classifier.extractor()
    runtime = ex.runtime
    temperature = classifier.saved.temperature
    out = np.zeros((len(paths), len(classifier.classes)), dtype=np.float64)
    for batch in iter_decoded(
        paths,
        decode_pre,
        batch_size=batch_size,
        workers=ex.workers if workers is None else workers,
        max_pixels=ex.max_pixels,
    ):
        if batch.failures:
            j, reason = batch.failures[0]
            raise TransferlabError(f"{paths[j]}: {reason}")
        crops = _five_crops(batch.images, pre.input_size) if five_crop else [batch.images]
        # mirror along W: a cat facing left is still a cat; the model may not know that
        views = crops + ([np.ascontiguousarray(c[..., ::-1]) for c in crops] if flip else [])
        # all views in one body call: per-call overhead dominates for small batches
        feats = runtime(np.concatenate(views))
        probs = softmax(head_logits(classifier, feats), temperature)
        out[batch.indices] = probs.reshape(len(views), len(batch.indices), -1).mean(axis=0)
    return out


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], _EPS, 1.0))))


def calibrate(
    classifier: Classifier,
    val: Split,
    *,
    test: Split | None = None,
    val_logits: np.ndarray | None = None,
    test_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Temperature scaling: fit ``T`` on the val split's logits, store it in the model.

    ``classifier.saved.temperature`` is set, so its predictions use ``softmax(logits / T)``
    from now on (argmax, hence accuracy, is unchanged); ``classifier.save(run)`` or
    ``classifier.saved.save(run)`` writes it to ``model.json``. Returns the temperature and,
    per split (val, and test when given), ECE and log-loss before (T = 1) and after. The test
    numbers are the honest ones: T was fitted on val, and with a few hundred images it can
    make test ECE worse. Precomputed raw logits can be passed to skip the feature pass.
    """
    vl = split_logits(classifier, val) if val_logits is None else np.asarray(val_logits)
    t = fit_temperature(vl, val.labels)
    classifier.saved.temperature = float(t)
    result: dict[str, Any] = {"temperature": float(t), "fitted_on": "val", "n_val": len(val)}
    pairs = [("val", val, vl)]
    if test is not None:
        tl = split_logits(classifier, test) if test_logits is None else np.asarray(test_logits)
        pairs.append(("test", test, tl))
    for name, split, logits in pairs:
        before, after = softmax(logits), softmax(logits, t)
        result[name] = {
            "n": len(split),
            "ece_before": expected_calibration_error(before, split.labels),
            "ece_after": expected_calibration_error(after, split.labels),
            "nll_before": _nll(before, split.labels),
            "nll_after": _nll(after, split.labels),
        }
    return result


def evaluate_split(
    classifier: Classifier,
    prepared: PreparedData,
    split: str = "test",
    *,
    tta: str | bool | None = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """The classification report of one prepared split, with the extras asked for.

    * ``calibrate``: fits the temperature on the val split (``classifier.saved.temperature`` is
      set; saving the model stores it) and adds ``"calibration"``: ECE and log loss before/after
      for val and ``split``.
    * ``tta``: ``"flip"`` (or True) or ``"flip5crop"``; the split is also scored with test-time
      augmentation, and ``"tta"`` holds both summaries.
    """
    mode = {True: "flip", False: "none", None: "none"}.get(tta, tta)  # type: ignore[arg-type]
    if mode not in TTA_MODES:
        raise TransferlabError(f"tta takes one of {', '.join(TTA_MODES)}; got {tta!r}")
    if split not in prepared.splits:
        raise TransferlabError(
            f"{prepared.index.root}: no '{split}' split; available: {', '.join(prepared.splits)}"
        )
    target = prepared.splits[split]
    logits = split_logits(classifier, target)
    calibration = _calibrate_on_val(classifier, prepared, split, logits) if calibrate else None
    probs = softmax(logits, classifier.saved.temperature)
    report = classification_report(target.labels, probs, classifier.classes)
    if calibration is not None:
        report["calibration"] = calibration
    if mode != "none":
        tprobs = tta_probs(classifier, target, flip=True, five_crop=mode == "flip5crop")
        trep = classification_report(target.labels, tprobs, classifier.classes)
        report["tta"] = {
            "split": split,
            "mode": mode,
            "views": 10 if mode == "flip5crop" else 2,
            "plain": {k: report[k] for k in SUMMARY_KEYS},
            "tta": {k: trep[k] for k in SUMMARY_KEYS},
        }
    return report


def _calibrate_on_val(
    classifier: Classifier, prepared: PreparedData, split: str, logits: np.ndarray
) -> dict[str, Any]:
    val = prepared.splits.get("val")
    if val is None:
        raise TransferlabError(
            f"{prepared.index.root}: calibration needs a val split to fit the temperature"
        )
    held_out = split != "val"
    cal = calibrate(
        classifier,
        val,
        test=prepared.splits[split] if held_out else None,
        test_logits=logits if held_out else None,
    )
    if held_out:  # key the held-out numbers by the split's real name
        cal[split] = cal.pop("test")
    return cal
