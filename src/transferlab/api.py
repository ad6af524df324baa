"""The Python API: ``fit`` a folder of images, ``load`` a saved run, ``Classifier`` to use it.

DATA → discover (index of path/label/split) → scan (digest + decode check, leakage)
     → strategy (features | frozen | finetune | scratch…) → ClassifierNet
     → evaluate (val/test metrics with CIs) → save (safetensors + JSON run folder)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.config import FitConfig
from transferlab.data.discover import DatasetIndex, discover, find_cross_split_duplicates
from transferlab.data.scan import scan_files
from transferlab.errors import TransferlabError
from transferlab.evaluation.metrics import classification_report
from transferlab.model import SavedModel, atomic_write_text
from transferlab.progress import progress, warn
from transferlab.strategies import STRATEGIES, Split, StrategyContext

METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PreparedData:
    """A discovered dataset whose files were all read, digested and decode-checked."""

    index: DatasetIndex
    splits: dict[str, Split]
    skipped: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # same content in two splits: (path_a, path_b)

    def context(self, config: FitConfig, out: Path) -> StrategyContext:
        """What a strategy (or lr-find) needs: classes, the splits, the config, the run folder."""
        return StrategyContext(
            classes=self.index.classes,
            train=self.splits["train"],
            val=self.splits.get("val"),
            test=self.splits.get("test"),
            config=config,
            out=out,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index.to_dict(),
            "counts": {
                name: {c: int((s.labels == i).sum()) for i, c in enumerate(self.index.classes)}
                for name, s in self.splits.items()
            },
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "cross_split_duplicates": [list(pair) for pair in self.duplicates],
        }


def prepare_data(data: str | os.PathLike, config: FitConfig) -> PreparedData:
    """Discover the layout, then read every file once: unusable ones are reported and skipped
    (or fail the run with ``strict``); the same picture in two splits is reported as leakage."""
    index = discover(
        data,
        label_regex=config.label_regex,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    for problem in index.problems:
        warn(problem)
    samples = index.samples
    with progress(len(samples), "checking images") as advance:
        scan = scan_files(
            [s.path for s in samples],
            workers=config.workers,
            max_pixels=config.max_pixels,
            on_progress=advance,
        )
    bad = dict(scan.failures)
    skipped = [(samples[i].path, reason) for i, reason in scan.failures]
    if skipped:
        lines = "\n".join(f"  {p}: {r}" for p, r in skipped[:20])
        more = f"\n  … and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        if config.strict:
            raise TransferlabError(
                f"{len(skipped)} unusable image(s) (--strict):\n{lines}{more}\n"
                "Fix or remove them, or run without --strict to skip them."
            )
        warn(f"skipped {len(skipped)} unusable image(s):\n{lines}{more}")
    digests = {s.path: d for s, d in zip(samples, scan.digests, strict=True) if d is not None}
    dup_pairs = find_cross_split_duplicates(
        [s for i, s in enumerate(samples) if i not in bad], digests
    )
    duplicates = [(a.path, b.path) for a, b in dup_pairs]
    if duplicates:
        lines = "\n".join(f"  {a} == {b}" for a, b in duplicates[:10])
        warn(
            f"{len(duplicates)} image(s) appear in two splits (leakage inflates test scores):\n"
            f"{lines}"
        )
    splits: dict[str, Split] = {}
    for name in ("train", "val", "test"):
        rows = [(i, s) for i, s in enumerate(samples) if s.split == name and i not in bad]
        if rows:
            splits[name] = Split(
                paths=[s.path for _, s in rows],
                labels=np.array([index.label_index(s.label) for _, s in rows], dtype=np.int64),
                digests=[scan.digests[i] for i, _ in rows],
            )
    if "train" not in splits:
        raise TransferlabError(f"{data}: no usable training images")
    missing = [c for i, c in enumerate(index.classes) if not (splits["train"].labels == i).any()]
    if missing:
        raise TransferlabError(
            f"{data}: class(es) {', '.join(missing)} have no usable training images"
        )
    return PreparedData(index=index, splits=splits, skipped=skipped, duplicates=duplicates)


def fit(
    data: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    config: FitConfig | None = None,
    prepared: PreparedData | None = None,
    **options: Any,
) -> Classifier:
    """Train a classifier on a folder of images and evaluate it on val/test.

    ``options`` are ``FitConfig`` fields, e.g. ``fit("data/", backbone="resnet50.a1_in1k",
    strategy="features", head="linear")``. With ``out``, the run folder (model, metrics,
    data summary, history) is written there.
    """
    config = FitConfig(**options) if config is None else config
    config.validate()
    seed_everything(config.seed)
    t_start = time.perf_counter()
    prepared = prepared or prepare_data(data, config)
    out_path = Path(out) if out is not None else None
    ctx = prepared.context(config, out_path or Path(os.devnull))
    t0 = time.perf_counter()
    result = STRATEGIES[config.strategy](ctx)
    train_s = time.perf_counter() - t0
    saved = SavedModel(
        net=result.net.eval(),
        classes=prepared.index.classes,
        preprocess=result.preprocess,
        body=result.body,
        head=result.head,
        strategy=config.strategy,
        config=config.to_dict(),
    )
    clf = Classifier(saved)
    if ctx._backbone is not None and not result.body.get("trained"):
        clf._extractor = ctx._extractor  # same body: reuse its runtime and cache namespace
    metrics: dict[str, Any] = {}
    for name in ("val", "test"):
        split = prepared.splits.get(name)
        if split is None:
            continue
        probs = result.probs.get(name)
        if probs is None:
            probs = clf.predict_proba_split(split)
        metrics[name] = classification_report(split.labels, probs, saved.classes)
    metrics["strategy"] = config.strategy
    metrics["timings"] = {**ctx.timings, "train_s": train_s}
    metrics["timings"]["total_s"] = time.perf_counter() - t_start
    metrics["info"] = result.info
    if ctx.extract_stats:
        metrics["extraction"] = ctx.extract_stats
    clf.metrics = metrics
    clf.history = result.history
    clf.data_summary = prepared.summary()
    if out_path is not None and is_rank_zero():
        clf.save(out_path)
    return clf


def is_rank_zero() -> bool:
    """Under srun, torchrun or Fabric's ddp re-launch every rank runs the whole command; only
    rank 0 writes the run folder and prints. Reads the variables Lightning reads, in its order,
    without importing Lightning on the features path."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


class Classifier:
    """A trained model: predict, evaluate, save. Build with ``fit`` or ``load``."""

    def __init__(self, saved: SavedModel) -> None:
        self.saved = saved
        self.metrics: dict[str, Any] = {}
        self.history: list[dict] = []
        self.data_summary: dict[str, Any] = {}
        self._extractor = None

    @property
    def classes(self) -> list[str]:
        return self.saved.classes

    @property
    def net(self) -> torch.nn.Module:
        return self.saved.net

    def extractor(self, *, engine: str = "auto", batch_size: int = 32, workers: int | None = None):
        """The body on its fastest runtime, with the feature cache of this body's identity."""
        if self._extractor is None:
            from transferlab.backbones import Backbone
            from transferlab.cache import FeatureCache
            from transferlab.extract import FeatureExtractor

            body = self.saved.body
            backbone = Backbone(
                spec=body["spec"],
                model=self.saved.net.body.eval(),
                preprocess=self.saved.preprocess,
                num_features=int(self.saved.head["in_features"]),
                weights_hash=body["weights_hash"],
                pretrained=not body.get("trained", False),
            )
            cfg = self.saved.config
            # The training machine's cache folder is used when it is here too (a re-evaluation
            # then hits it); a model moved to another machine uses this machine's default.
            cache_dir = cfg.get("cache_dir")
            usable = cache_dir and os.access(cache_dir, os.W_OK)
            self._extractor = FeatureExtractor(
                backbone,
                cache=FeatureCache(Path(cache_dir) if usable else None),
                engine=engine,
                batch_size=batch_size,
                workers=workers,
                max_pixels=cfg.get("max_pixels", 89_478_485),
            )
        return self._extractor

    def _head_probs(self, features: np.ndarray) -> np.ndarray:
        head = self.saved.net.head.eval()
        with torch.inference_mode():
            logits = head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
            return torch.softmax(logits / self.saved.temperature, dim=1).numpy()

    def predict_proba_split(self, split: Split) -> np.ndarray:
        ex = self.extractor()
        with progress(len(split), "predicting") as advance:
            got = ex(split.paths, split.digests, on_progress=advance)
        if got.failures:
            path, reason = got.failures[0]
            raise TransferlabError(f"{path}: {reason}")
        return self._head_probs(got.features)

    def evaluate(
        self, data: str | os.PathLike, *, split: str = "test", config: FitConfig | None = None
    ) -> dict[str, Any]:
        """Metrics on one split of ``data`` (discovered with the same seed and fractions)."""
        cfg = config or FitConfig.from_dict(self.saved.config)
        prepared = prepare_data(data, cfg)
        if split not in prepared.splits:
            raise TransferlabError(
                f"{data}: no '{split}' split; available: {', '.join(prepared.splits)}"
            )
        if prepared.index.classes != self.classes:
            raise TransferlabError(
                f"{data}: classes {prepared.index.classes} differ from the model's {self.classes}"
            )
        s = prepared.splits[split]
        return classification_report(s.labels, self.predict_proba_split(s), self.classes)

    # --- figures (delegate to transferlab.evaluation.plots; each returns a matplotlib Figure
    # and writes a PNG when ``out`` is given) ---

    def plot_curves(self, out: str | os.PathLike | None = None):
        """Learning curves, accuracy | loss, train vs val (per epoch, or per L2 of a linear
        head)."""
        from transferlab.evaluation.plots import plot_learning_curves

        return plot_learning_curves(self.history, out=out)

    def plot_confusion(self, split: str = "test", out: str | os.PathLike | None = None):
        """Confusion matrix of a split evaluated at fit time: counts | row-normalised."""
        from transferlab.evaluation.plots import plot_confusion

        if split not in self.metrics:
            raise TransferlabError(f"no '{split}' results; have: {', '.join(self.metrics)}")
        cm = self.metrics[split]["confusion_matrix"]
        return plot_confusion(cm, self.classes, title=f"{split} confusion matrix", out=out)

    def plot_reliability(
        self,
        split: str = "test",
        *,
        data: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
    ):
        """Reliability diagram + ECE of a split (of the fitted data, or of ``data``)."""
        from transferlab.evaluation.analysis import classifier_split
        from transferlab.evaluation.plots import plot_reliability

        s = classifier_split(self, split, data)
        probs = self.predict_proba_split(s)
        return plot_reliability(probs, s.labels, title=f"reliability ({split})", out=out)

    def iter_predict(
        self, sources: Sequence[str | os.PathLike] | str, *, batch_size: int = 32
    ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """Stream (path, probabilities or None, error or None) over files, folders and globs,
        in constant memory; unreadable files yield an error instead of stopping the run."""
        # One prediction engine for the API, the CLI and the server (transferlab.predict).
        from transferlab.predict import PredictionEngine

        for p in PredictionEngine(self, batch_size=batch_size).iter_predict(sources):
            yield p.path, p.probs, p.error

    def predict(
        self, sources: Sequence[str | os.PathLike] | str, *, top_k: int = 1
    ) -> list[dict[str, Any]]:
        """Top-k labels with probabilities for each image; errors are reported per file."""
        out = []
        k = max(1, min(top_k, len(self.classes)))
        for path, probs, err in self.iter_predict(sources):
            if probs is None:
                out.append({"path": path, "error": err})
                continue
            order = np.argsort(-probs, kind="stable")[:k]
            out.append(
                {
                    "path": path,
                    "label": self.classes[order[0]],
                    "top_k": [(self.classes[i], float(probs[i])) for i in order],
                }
            )
        return out

    def save(self, out: str | os.PathLike) -> Path:
        out = Path(out)
        self.saved.save(out)
        if self.metrics:
            _write_json(out / METRICS_FILE, self.metrics)
        if self.data_summary:
            _write_json(out / DATA_FILE, self.data_summary)
        if self.history:
            _write_json(out / HISTORY_FILE, self.history)
        return out


def load(path: str | os.PathLike) -> Classifier:
    """Load a saved run folder (safetensors + JSON only; nothing is unpickled or executed)."""
    clf = Classifier(SavedModel.load(path))
    for name, attr in (
        (METRICS_FILE, "metrics"),
        (HISTORY_FILE, "history"),
        (DATA_FILE, "data_summary"),
    ):
        f = Path(path) / name
        if f.is_file():
            setattr(clf, attr, json.loads(f.read_text()))
    return clf


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


__all__ = ["Classifier", "PreparedData", "fit", "is_rank_zero", "load", "prepare_data"]
