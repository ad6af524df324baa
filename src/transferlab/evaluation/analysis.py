"""Error analysis on a trained run: what it gets wrong, how sure it is, and how it compares.

* :func:`top_losses` / :func:`most_confused` / :func:`suspect_labels`: where to look first;
* :func:`tta_probs`: test-time augmentation (horizontal flip, optionally 5 crops);
* :func:`calibrate`: temperature scaling fitted on val, stored in the model so every later
  prediction uses it;
* :func:`compare_runs`: accuracy with CIs per run, and McNemar's test on per-image correctness
  when the runs were scored on the same test images.

Splits of a saved run are rebuilt from its ``data.json`` (no re-scan: the digests needed by the
feature cache are re-hashed, which is I/O, not decoding) or, from a dataset folder given
explicitly, by :func:`prepare_run_data`: discovered and decode-checked exactly as ``fit`` does,
so unusable files are reported and skipped instead of failing the evaluation. The
frozen-body strategies then get their features from the cache, so everything here costs
seconds.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import (
    expected_calibration_error,
    fit_temperature,
    mcnemar,
)

if TYPE_CHECKING:
    from transferlab.api import Classifier
    from transferlab.data.prepared import PreparedData

__all__ = [
    "PREDICTIONS_FILE",
    "calibrate",
    "classifier_split",
    "compare_runs",
    "head_logits",
    "load_predictions",
    "most_confused",
    "out_of_fold_probs",
    "prepare_run_data",
    "read_json",
    "resolve_splits",
    "save_predictions",
    "split_features",
    "split_logits",
    "suspect_labels",
    "top_losses",
    "train_out_of_fold_probs",
    "tta_probs",
]

PREDICTIONS_FILE = "predictions.csv"
_EPS = 1e-15  # probability floor for -log p (a confident miss costs ~34.5, not inf)


# --------------------------------------------------------------------------------------------
# a run's files, splits and predictions


def read_json(path: str | os.PathLike[str]) -> Any:
    """A run file's JSON content; None when the file does not exist.

    The one policy for every run file (``model.json``, ``metrics.json``, ``data.json``,
    ``ladder.json``, ...): absent is normal (an older or partial run), but a file that is there
    and cannot be read or parsed is an error, and it names the file, never a silent None.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise TransferlabError(f"{path}: unreadable ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TransferlabError(f"{path}: unreadable JSON ({e})") from e


def prepare_run_data(
    data: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
) -> PreparedData:
    """A run's splits on a dataset folder given explicitly, built exactly as ``fit`` builds them.

    The one way evaluation code (``compare --data``, ``report --data``, ``evaluate``, export)
    turns a folder into splits: :func:`transferlab.api.prepare_data` with the run's
    configuration (``config``: ``SavedModel.config``, the ``FitConfig`` as a dict; its seed,
    fractions and label regex give the same split), which reads every file once: unusable
    images are reported, skipped and listed in ``.skipped`` (with the run's ``strict`` they fail
    it, as at fit time), and every split carries content digests for the feature cache.
    ``classes``: the model's; the folder's must be the same, in the same order.
    """
    from transferlab.config import FitConfig
    from transferlab.data.prepared import prepare_data

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
    left out. ``digests=False`` skips hashing of the recorded images (digests are then empty
    strings: fine for showing images, not for the feature cache).
    """
    from transferlab.data.discover import DatasetIndex

    run = None if isinstance(source, Mapping) else Path(source)
    if prepared is None and data is not None:
        if config is None and run is not None:
            config = (read_json(run / "model.json") or {}).get("config")
        prepared = prepare_run_data(data, config, classes)
    if prepared is not None:
        if classes is not None and list(prepared.index.classes) != list(classes):
            raise TransferlabError(
                f"{prepared.index.root}: classes {prepared.index.classes} differ from the "
                f"model's {list(classes)}"
            )
        return {name: prepared.splits[name] for name in names if name in prepared.splits}

    summary = source if run is None else read_json(run / "data.json")
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
        paths = [s.path for s in samples]
        out[name] = Split(
            paths=paths,
            labels=np.array([classes.index(s.label) for s in samples], dtype=np.int64),
            digests=_digests(paths) if digests else [""] * len(paths),
        )
    return out


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


def _digests(paths: Sequence[str]) -> list[str]:
    from transferlab.data.images import file_digest

    # hashlib releases the GIL: threads overlap the reads, a few hundred files take ~0.1 s.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(file_digest, paths))


def head_logits(classifier: Classifier, features: np.ndarray) -> np.ndarray:
    """The head's raw logits (no temperature) for bottleneck features ``(n, d)``."""
    head = classifier.saved.net.head.eval()
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return head(x).double().numpy()


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def split_features(classifier: Classifier, split: Split) -> np.ndarray:
    """Bottleneck features of a split (from the feature cache where the body is unchanged)."""
    got = classifier.extractor()(split.paths, split.digests)
    if got.failures:
        path, reason = got.failures[0]
        raise TransferlabError(f"{path}: {reason}")
    return got.features


def split_logits(classifier: Classifier, split: Split) -> np.ndarray:
    """Raw logits (before the model's temperature) for every image of a split."""
    return head_logits(classifier, split_features(classifier, split))


def save_predictions(
    run_dir: str | os.PathLike[str],
    predictions: Mapping[str, tuple[Split, np.ndarray]],
    classes: Sequence[str],
) -> Path:
    """Write ``predictions.csv`` (split, path, label, predicted, one probability per class):
    per-image results, so runs can be compared image by image without re-running them."""
    path = Path(run_dir) / PREDICTIONS_FILE
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "path", "label", "predicted", *(f"p_{c}" for c in classes)])
        for name, (split, probs) in predictions.items():
            pred = np.asarray(probs).argmax(axis=1)
            for p, y, k, row in zip(split.paths, split.labels, pred, probs, strict=True):
                w.writerow([name, p, classes[int(y)], classes[int(k)], *(f"{v:.6f}" for v in row)])
    os.replace(tmp, path)
    return path


def load_predictions(run_dir: str | os.PathLike[str], split: str = "test") -> dict[str, Any] | None:
    """``{"paths", "labels", "predicted", "probs", "classes"}`` of one split from
    ``predictions.csv``, or None when the run has none for that split."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[:4] != ["split", "path", "label", "predicted"]:
            return None
        classes = [h[2:] for h in header[4:]]
        rows = [r for r in reader if r and r[0] == split]
    if not rows:
        return None
    return {
        "classes": classes,
        "paths": [r[1] for r in rows],
        "labels": [r[2] for r in rows],
        "predicted": [r[3] for r in rows],
        "probs": np.array([[float(v) for v in r[4:]] for r in rows], dtype=np.float64),
    }


# --------------------------------------------------------------------------------------------
# where the model is wrong


def top_losses(
    probs: np.ndarray,
    y_true: np.ndarray,
    paths: Sequence[str],
    k: int = 9,
    *,
    classes: Sequence[str] | None = None,
    only_wrong: bool = True,
) -> list[dict[str, Any]]:
    """The ``k`` items with the highest loss ``-log p(true class)``, worst first.

    With ``only_wrong`` (default) only misclassified items are listed, so the top entries are
    the *most confidently wrong* ones. Each entry: ``index``, ``path``, ``label``,
    ``predicted`` (names when ``classes`` is given, else indices), ``p_true``, ``p_pred``,
    ``loss``. Ties keep input order (stable sort).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or len(paths) != len(y):
        raise TransferlabError(
            f"top_losses needs (n, C) probs with n labels and n paths; got {probs.shape}, "
            f"{len(y)} labels, {len(paths)} paths"
        )
    idx = np.arange(len(y))
    p_true = probs[idx, y]
    pred = probs.argmax(axis=1)
    loss = -np.log(np.clip(p_true, _EPS, 1.0))
    candidates = idx[pred != y] if only_wrong else idx
    order = candidates[np.argsort(-loss[candidates], kind="stable")][: max(0, int(k))]

    def name(i: int) -> str | int:
        return classes[i] if classes is not None else int(i)

    return [
        {
            "index": int(i),
            "path": str(paths[i]),
            "label": name(int(y[i])),
            "predicted": name(int(pred[i])),
            "p_true": float(p_true[i]),
            "p_pred": float(probs[i, pred[i]]),
            "loss": float(loss[i]),
        }
        for i in order
    ]


def most_confused(
    confusion: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], k: int = 5
) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as ``(true, predicted, count)``, largest first
    (ties in row-major order); cells with no mistakes are left out."""
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(classes)
    if cm.shape != (c, c):
        raise TransferlabError(f"confusion matrix is {cm.shape} for {c} classes")
    cells = [(int(cm[i, j]), i, j) for i in range(c) for j in range(c) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda t: -t[0])  # stable: equal counts stay in row-major order
    return [(classes[i], classes[j], n) for n, i, j in cells[: max(0, int(k))]]


def out_of_fold_probs(
    features: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int | None = None,
    folds: int = 5,
    seed: int = 0,
    l2: float | None = None,
) -> np.ndarray:
    """Probabilities for every item from a linear head that never saw it (stratified k-fold).

    A head scored on its own training images is overconfident exactly where labels are wrong
    (it memorises them); predicting each fold with a head fitted on the others avoids that.
    ``l2`` fixes the strength (default :data:`transferlab.heads.DEFAULT_L2`) so each fold is one
    L-BFGS fit, not a grid search.
    """
    from transferlab.heads import DEFAULT_L2, fit_head

    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    c = int(num_classes if num_classes is not None else y.max() + 1)
    counts = np.bincount(y, minlength=c)
    # no more folds than the rarest class has members, or some fold would lack that class
    folds = max(2, min(int(folds), int(counts[counts > 0].min())))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for cls in range(c):  # stratified: each class spread evenly over the folds
        members = rng.permutation(np.flatnonzero(y == cls))
        fold_of[members] = np.arange(len(members)) % folds
    out = np.zeros((len(y), c), dtype=np.float64)
    for f in range(folds):
        held = fold_of == f
        head = fit_head(
            "linear",
            x[~held],
            y[~held],
            None,
            None,
            num_classes=c,
            seed=seed,
            l2=float(l2 if l2 is not None else DEFAULT_L2),
        )
        out[held] = _softmax(head.predict_logits(x[held]))
    return out


def train_out_of_fold_probs(
    classifier: Classifier, train: Split, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold probabilities on the training split, from the run's own features and L2."""
    feats = split_features(classifier, train)
    return out_of_fold_probs(
        feats,
        train.labels,
        num_classes=len(classifier.classes),
        folds=folds,
        seed=seed,
        l2=classifier.saved.head.get("l2"),
    )


def suspect_labels(
    probs: np.ndarray,
    y: np.ndarray,
    paths: Sequence[str],
    k: int = 10,
    *,
    classes: Sequence[str] | None = None,
    min_confidence: float = 0.5,
) -> list[dict[str, Any]]:
    """Training images the model confidently disagrees with: possible label errors.

    Pass *out-of-fold* probabilities (:func:`out_of_fold_probs`): in-sample ones understate
    the disagreement on exactly the mislabelled images. Listed: items whose predicted class
    differs from their label with probability >= ``min_confidence``, lowest probability of the
    given label first. Entries as in :func:`top_losses`.
    """
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    keep = (pred != np.asarray(y)) & (conf >= min_confidence)
    rows = top_losses(probs, y, paths, k=len(y), classes=classes, only_wrong=True)
    return [r for r in rows if keep[r["index"]]][: max(0, int(k))]


# --------------------------------------------------------------------------------------------
# test-time augmentation


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
    from transferlab.data.loader import iter_decoded

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
        probs = _softmax(head_logits(classifier, feats), temperature)
        out[batch.indices] = probs.reshape(len(views), len(batch.indices), -1).mean(axis=0)
    return out


# --------------------------------------------------------------------------------------------
# calibration


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
        before, after = _softmax(logits), _softmax(logits, t)
        result[name] = {
            "n": len(split),
            "ece_before": expected_calibration_error(before, split.labels),
            "ece_after": expected_calibration_error(after, split.labels),
            "nll_before": _nll(before, split.labels),
            "nll_after": _nll(after, split.labels),
        }
    return result


# --------------------------------------------------------------------------------------------
# comparing runs


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in run_dirs]
    # two runs called "latest" in different folders: fall back to parent/name
    return [
        f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n
        for p, n in zip(run_dirs, names, strict=True)
    ]


def _split_recipe(config: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What decides a run's splits and skipped files on a folder: runs that agree share a scan."""
    from transferlab.config import FitConfig

    cfg = FitConfig.from_dict(dict(config)) if config else FitConfig()
    return (
        cfg.label_regex,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.seed,
        cfg.max_pixels,
        cfg.strict,
    )


def _summary(m: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not m or "accuracy" not in m:
        return None
    return {
        "accuracy": float(m["accuracy"]),
        "accuracy_ci95": [float(v) for v in m["accuracy_ci95"]],
        "n": int(m["n"]),
    }


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Accuracy with 95% CIs per run, and pairwise McNemar tests on a shared test set.

    Accuracies come from each run's ``metrics.json`` (or, with ``data``, from re-scoring the
    run on that folder's test split). McNemar needs per-image correctness on the *same*
    images: it is taken from ``data`` (each run scored on it) or from the runs'
    ``predictions.csv`` (written by their reports); runs are compared only when their test
    image sets are identical, which is what makes the test paired (and far more sensitive than
    comparing two overlapping CIs). ``data`` is scanned as ``fit`` scans it
    (:func:`prepare_run_data`): unusable files are skipped and listed (``"skipped"``, and per
    run). With ``out``, ``compare.json`` and ``compare.png`` are written there. Returns
    ``{"runs": [...], "shared_test": bool, "mcnemar": [...], "note": str,
    "chart": path | None, "skipped": [{"path", "reason"}, ...]}``.
    """
    from transferlab.evaluation.metrics import classification_report

    dirs = [Path(r) for r in run_dirs]
    if len(dirs) < 1:
        raise TransferlabError("give at least one run folder to compare")
    for d in dirs:
        if not (d / "model.json").is_file():
            raise TransferlabError(f"{d}: not a transferlab run folder (no model.json)")
    names = _run_names(dirs)
    runs: list[dict[str, Any]] = []
    correct: dict[str, dict[str, bool]] = {}  # run name -> {test path: correct}
    scanned: dict[tuple[Any, ...], PreparedData] = {}  # one scan per distinct split recipe
    skipped: dict[str, str] = {}  # path -> reason, over every scan
    for d, name in zip(dirs, names, strict=True):
        model = read_json(d / "model.json")
        metrics = read_json(d / "metrics.json") or {}
        row: dict[str, Any] = {
            "name": name,
            "run_dir": str(d),
            "strategy": model.get("strategy"),
            "backbone": model.get("body", {}).get("spec"),
            "val": _summary(metrics.get("val")),
            "test": _summary(metrics.get("test")),
        }
        if data is not None:
            import transferlab

            clf = transferlab.load(d)
            key = _split_recipe(clf.saved.config)
            if key not in scanned:
                scanned[key] = prepare_run_data(data, clf.saved.config)
            prepared = scanned[key]
            splits = resolve_splits(d, ("test",), classes=clf.classes, prepared=prepared)
            if "test" not in splits:
                raise TransferlabError(f"{data}: no test split to compare the runs on")
            s = splits["test"]
            row["skipped"] = [{"path": p, "reason": r} for p, r in prepared.skipped]
            skipped.update(prepared.skipped)
            probs = _softmax(split_logits(clf, s), clf.saved.temperature)
            row["test"] = _summary(classification_report(s.labels, probs, clf.classes))
            row["test_source"] = str(data)
            ok = probs.argmax(axis=1) == s.labels
            correct[name] = dict(zip(s.paths, ok.tolist(), strict=True))
        else:
            pred = load_predictions(d, "test")
            if pred is not None:
                correct[name] = {
                    p: lab == pr
                    for p, lab, pr in zip(
                        pred["paths"], pred["labels"], pred["predicted"], strict=True
                    )
                }
        runs.append(row)

    tests = [frozenset(correct[n]) if n in correct else None for n in names]
    shared = len(dirs) > 1 and tests[0] is not None and all(t == tests[0] for t in tests)
    pairs: list[dict[str, Any]] = []
    if shared:
        order = sorted(tests[0])  # align by path, whatever order each run listed them in
        for a, b in combinations(names, 2):
            res = mcnemar(
                np.array([correct[a][p] for p in order]), np.array([correct[b][p] for p in order])
            )
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "only_a_correct": res["b"],
                    "only_b_correct": res["c"],
                    "statistic": res["statistic"],
                    "p_value": res["p_value"],
                    "method": res["method"],
                }
            )
        note = f"McNemar's test on the same {len(order)} test images"
    elif len(dirs) < 2:
        note = "one run: nothing to test against"
    elif any(t is None for t in tests):
        note = (
            "no per-image test predictions for some runs (no predictions.csv); pass --data to "
            "score them all on one test set for McNemar's test"
        )
    else:
        note = "the runs were tested on different images: McNemar's test needs the same ones"
    result: dict[str, Any] = {
        "runs": runs,
        "shared_test": shared,
        "mcnemar": pairs,
        "note": note,
        "chart": None,
        # unusable files of ``data``, left out of every score (as fit leaves them out)
        "skipped": [{"path": p, "reason": r} for p, r in skipped.items()],
    }
    if out is not None:
        from transferlab.evaluation.plots import plot_compare

        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        if any(r["val"] or r["test"] for r in runs):
            plot_compare(runs, title="accuracy per run (95% CI)", out=out_dir / "compare.png")
            result["chart"] = str(out_dir / "compare.png")
        (out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    return result
