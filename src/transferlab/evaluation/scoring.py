"""Scoring a trained classifier on images: its splits, logits, probabilities, test-time
augmentation and temperature scaling — what ``Classifier.evaluate`` and every analysis build on.

Splits of a saved run are rebuilt from its ``data.json`` (no re-scan: the digests needed by the
feature cache come from the dataset's scan index; only files changed since are re-hashed) or,
from a dataset folder given explicitly, by :func:`prepare_run_data`: discovered and
decode-checked exactly as ``fit`` does, so unusable files are reported and skipped instead of
failing the evaluation. The frozen-body strategies then get their features from the cache, so
everything here costs seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferlab.config import TTA_MODES, FitConfig
from transferlab.data.discover import DatasetIndex
from transferlab.data.loader import iter_decoded
from transferlab.data.prepared import PreparedData, Split, prepare_data
from transferlab.data.scan import file_digests
from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import (
    classification_report,
    expected_calibration_error,
    fit_temperature,
)
from transferlab.model import softmax
from transferlab.progress import info
from transferlab.runs import DATA_FILE, MODEL_FILE, read_run_json

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "SUMMARY_KEYS", "calibrate", "classifier_split", "evaluate_split", "head_logits",
    "evaluation_data", "prepare_run_data", "resolve_splits", "split_features", "split_logits",
    "tta_probs", "with_digests",
]  # fmt: skip

SUMMARY_KEYS = ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "log_loss", "ece")
_EPS = 1e-15  # probability floor for -log p (a confident miss costs ~34.5, not inf)


def prepare_run_data(
    data: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
) -> PreparedData:
    """A run's splits on a dataset folder given explicitly, built exactly as ``fit`` builds them.

    The one way evaluation code (``compare --data``, ``report --data``, ``evaluate``, export)
    turns a folder into splits: :func:`transferlab.data.prepared.prepare_data` with the run's
    configuration (``config``: ``SavedModel.config``, the ``FitConfig`` as a dict; its seed,
    fractions and label regex give the same split), which reads every file once: unusable
    images are reported, skipped and listed in ``.skipped`` (with the run's ``strict`` they fail
    it, as at fit time), and every split carries content digests for the feature cache.
    ``classes``: the model's; the folder's must be the same, in the same order.
    """
    cfg = FitConfig.from_dict(dict(config)) if config else FitConfig()
    prepared = prepare_data(data, cfg)
    if classes is not None and list(prepared.index.classes) != list(classes):
        raise TransferlabError(
            f"{data}: classes {prepared.index.classes} differ from the model's {list(classes)}"
        )
    return prepared


def resolve_splits(
    source: str | os.PathLike[str] | Mapping[str, Any],
    names: Sequence[str] = ("val", "test"),
    *,
    data: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    digests: bool = True,
    prepared: PreparedData | None = None,
) -> dict[str, Split]:
    """A run's splits as :class:`Split` objects (paths, labels, content digests).

    ``source`` is a run folder or a data summary (``Classifier.data_summary``, the content of
    ``data.json``). Without ``data`` the splits are the exact images the run saw, minus the
    ones it skipped; a missing file raises :class:`TransferlabError`. With ``data`` the folder
    goes through :func:`prepare_run_data` with the run's configuration (``config``; default:
    the run folder's ``model.json``): unusable files are skipped as at fit time. ``prepared``:
    that result already computed (one scan serves several calls). Splits with no images are
    left out. Recorded images' digests come from :func:`with_digests`; ``digests=False``
    leaves them empty strings (fine for showing images, not for the feature cache).
    """
    run = None if isinstance(source, Mapping) else Path(source)
    if prepared is None and data is not None:
        if config is None and run is not None:
            config = (read_run_json(run, MODEL_FILE) or {}).get("config")
        prepared = prepare_run_data(data, config, classes)
    if prepared is not None:
        if classes is not None and list(prepared.index.classes) != list(classes):
            raise TransferlabError(
                f"{prepared.index.root}: classes {prepared.index.classes} differ from the "
                f"model's {list(classes)}"
            )
        return {name: prepared.splits[name] for name in names if name in prepared.splits}

    summary = source if run is None else read_run_json(run, DATA_FILE)
    cache_dir = (config or {}).get("cache_dir")  # where the run's scan index is
    return _recorded_splits(summary, run, names, classes, digests=digests, cache_dir=cache_dir)


def _recorded_splits(
    summary: Mapping[str, Any] | None,
    run: Path | None,
    names: Sequence[str],
    classes: Sequence[str] | None,
    *,
    digests: bool,
    cache_dir: str | None = None,
) -> dict[str, Split]:
    """The exact images a run saw (its data summary), minus the ones it skipped."""
    if not summary or "index" not in summary:
        raise TransferlabError(
            f"{run or 'this model'}: no data summary (data.json) to find the run's images "
            "in; pass the dataset folder"
        )
    index = DatasetIndex.from_dict(summary["index"])
    skipped = {s["path"] for s in summary.get("skipped", [])}
    classes = list(classes) if classes is not None else list(index.classes)
    if list(index.classes) != classes:
        raise TransferlabError(f"{run}: classes {index.classes} differ from the model's {classes}")
    label_of = {c: i for i, c in enumerate(classes)}
    out: dict[str, Split] = {}
    for name in names:
        samples = [s for s in index.split(name) if s.path not in skipped]
        if not samples:
            continue
        missing = [s.path for s in samples if not os.path.isfile(s.path)]
        if missing:
            raise TransferlabError(
                f"{missing[0]}: missing ({len(missing)} image(s) of the '{name}' split are gone; "
                "pass the dataset folder if it moved)"
            )
        out[name] = Split(
            paths=[s.path for s in samples],
            labels=np.array([label_of[s.label] for s in samples], dtype=np.int64),
            digests=[""] * len(samples),
        )
    return with_digests(out, index.root, cache_dir) if digests else out


def with_digests(
    splits: Mapping[str, Split],
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Split]:
    """``splits`` with the content digests of their images, as the feature cache keys them:
    from the scan index of dataset ``root`` (under ``cache_dir``) for files unchanged since
    they were scanned, hashed otherwise; one look-up for all the splits."""
    paths = [p for split in splits.values() for p in split.paths]
    digests = iter(file_digests(paths, index_root=root, cache_dir=cache_dir))
    return {
        name: replace(split, digests=[next(digests) for _ in split.paths])
        for name, split in splits.items()
    }


def classifier_split(
    classifier: Classifier, name: str, data: str | os.PathLike[str] | None = None
) -> Split:
    """One split of a classifier's data: from its data summary (a fitted model) or ``data``."""
    if data is None and not classifier.data_summary:
        raise TransferlabError(
            "this model carries no data summary (loaded from a folder?); pass data=DATASET"
        )
    splits = resolve_splits(
        classifier.data_summary,
        (name,),
        data=data,
        classes=classifier.classes,
        config=classifier.saved.config,
    )
    if name not in splits:
        raise TransferlabError(f"no '{name}' split in the data")
    return splits[name]


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


def evaluation_data(
    data: str | os.PathLike[str],
    config: Mapping[str, Any] | None,
    classes: Sequence[str],
    split: str = "test",
    *,
    own_data: bool = False,
) -> tuple[PreparedData, str]:
    """The images to score on ``data`` and the name of that split.

    ``split`` of the folder as ``fit`` splits it, except: ``"all"`` scores every usable image of
    every split; and so does the default ``"test"`` on a folder without split folders that is not
    the run's own data — its carved 20% "test" would silently leave most of it unscored (on the
    run's own folder the carved test split is the held-out one, and it is kept).
    """
    prepared = prepare_run_data(data, config, classes)
    unsplit = (prepared.index.generated_split or {}).get("from") == "all"
    if split != "all" and not (split == "test" and unsplit and not own_data):
        return prepared, split
    parts = [prepared.splits[name] for name in ("train", "val", "test") if name in prepared.splits]
    whole = Split(
        paths=[p for s in parts for p in s.paths],
        labels=np.concatenate([s.labels for s in parts]),
        digests=[d for s in parts for d in s.digests],
    )
    counts = ", ".join(f"{c} {int((whole.labels == i).sum())}" for i, c in enumerate(classes))
    why = " (it has no split folders)" if unsplit and split != "all" else ""
    info(f"{data}: scoring all {len(whole)} usable images{why}: {counts}")
    return replace(prepared, splits={"all": whole}), "all"
