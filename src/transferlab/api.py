"""The Python API: ``fit`` a folder of images, ``load`` a saved run, ``Classifier`` to use it.

DATA → discover (index of path/label/split) → scan (digest + decode check, leakage)
     → strategy (features | frozen | finetune | scratch…) → ClassifierNet
     → evaluate (val/test metrics with CIs) → save (safetensors + JSON run folder)
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.config import AUTO, FitConfig, config_from, with_options
from transferlab.data.prepared import PreparedData, Split, prepare_data
from transferlab.errors import TransferlabError
from transferlab.evaluation.card import ClassifierViews
from transferlab.evaluation.exported import evaluate_exported
from transferlab.evaluation.metrics import classification_report
from transferlab.evaluation.run_data import evaluation_data, fitted_on, prepare_run_data
from transferlab.evaluation.scoring import evaluate_split, head_logits
from transferlab.model import LazyNet, softmax
from transferlab.predict import ExportedClassifier, is_exported_file
from transferlab.progress import progress, verbosity, warn
from transferlab.provenance import (
    input_manifest,
    recorded_inputs,
    require_intact,
    seal_run,
    trained_on,
    write_provenance,
)
from transferlab.runs import (
    AUTO_FILE,
    DATA_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    SavedModel,
    begin_run,
    check_out_folder,
    finish_run,
    partial_dir,
)
from transferlab.storage import read_json, write_json
from transferlab.strategies import (
    STRATEGIES,
    StrategyContext,
    StrategyResult,
    feature_extractor,
    ignored_options,
    strategy_context,
)
from transferlab.system import is_rank_zero, seed_everything
from transferlab.tracking import finish_fit


def fit(
    data: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    config: FitConfig | None = None,
    prepared: PreparedData | None = None,
    verbose: bool | None = None,
    **options: Any,
) -> Classifier:
    """Train a classifier on a folder of images and evaluate it on val/test.

    ``options`` are ``FitConfig`` fields (listed below), e.g. ``fit("data/",
    backbone="resnet50.a1_in1k", strategy="features", head="linear")``. With ``out``, the run
    folder (model, metrics, data summary, history) is written there. ``verbose``: progress
    (live bars in a notebook or terminal, a line per phase otherwise); None: unless
    TRANSFERLAB_QUIET is set.
    """
    if config is None:
        config = config_from(options).validate(cli=False)  # messages name Python arguments
    with verbosity(verbose):
        return _fit(data, out, config, prepared)


fit = with_options(fit)


def _fit(
    data: str | os.PathLike, out: Any, config: FitConfig, prepared: PreparedData | None
) -> Classifier:
    config.validate()  # a given config (the CLI's): its messages name the CLI's flags
    ignored = ignored_options(config)
    if ignored:
        warn(f"{', '.join(ignored)}: ignored by strategy {config.strategy!r} (no effect)")
    if out is not None and is_rank_zero():
        check_out_folder(out, replace=config.overwrite or config.resume)
    seed_everything(config.seed)
    t_start = time.perf_counter()
    prepared = prepared or prepare_data(data, config)  # discover + scan: every file read once
    out_path = Path(out) if out is not None else None
    work = None  # OUT.partial: the run is built there and renamed to OUT when complete
    if out_path is not None:
        work = begin_run(out_path, data, config) if is_rank_zero() else partial_dir(out_path)
    ctx, result, auto = _train(prepared, config, work or Path(os.devnull))
    clf = Classifier(
        SavedModel(
            net=result.net if isinstance(result.net, LazyNet) else result.net.eval(),
            classes=prepared.classes,
            preprocess=result.preprocess,
            body=result.body,
            head=result.head,
            # auto: the one it chose (auto.json says why), "ensemble" for an ensemble
            strategy=result.info.get("strategy", ctx.config.strategy),
            config=ctx.config.to_dict(),
        )
    )
    if ctx.extractor is not None and not result.body.get("trained"):
        clf._extractor = ctx.extractor  # same body: reuse its runtime and cache namespace
    clf.metrics = _fit_metrics(clf, prepared, result, ctx)
    clf.metrics["timings"]["total_s"] = time.perf_counter() - t_start
    clf.history = result.history
    clf.data_summary = prepared.summary()
    clf.inputs = input_manifest(prepared)  # provenance.json's manifest, from the scan's digests
    if auto is not None:
        clf.metrics["auto"] = {k: auto[k] for k in ("chosen", "tried", "seconds", "time_budget_s")}
    if work is not None and out_path is not None and is_rank_zero():
        if auto is not None:
            write_json(work / AUTO_FILE, auto)  # sealed with the run by the save below
        clf.run_dir = finish_run(work, out_path, clf._write)
    finish_fit(clf, out_path)  # --track mlflow
    return clf


def _train(
    prepared: PreparedData, config: FitConfig, out: Path
) -> tuple[StrategyContext, StrategyResult, dict[str, Any] | None]:
    """The strategy's training, or auto's choice among strategies (then: its record)."""
    t0 = time.perf_counter()
    if config.strategy == AUTO:
        from transferlab.selection.auto import fit_auto  # rank, LogME: only auto needs them

        choice = fit_auto(prepared, config, out)
        ctx, result, record = choice.ctx, choice.result, choice.record
    else:
        ctx = strategy_context(prepared, config, out)  # the backbone is built here
        result, record = STRATEGIES[config.strategy].run(ctx), None
    ctx.timings["train_s"] = time.perf_counter() - t0
    return ctx, result, record


def _fit_metrics(
    clf: Classifier, prepared: PreparedData, result: StrategyResult, ctx: StrategyContext
) -> dict[str, Any]:
    """val/test classification reports (from the strategy's probabilities when it has them,
    else by running the trained model), plus the run's timings and strategy details."""
    metrics: dict[str, Any] = {}
    for name in ("val", "test"):
        split = prepared.splits.get(name)
        if split is None:
            continue
        probs = result.probs.get(name)
        if probs is None:
            probs = clf.predict_proba_split(split)
        metrics[name] = classification_report(split.labels, probs, clf.classes)
    metrics["strategy"] = result.info.get("strategy", ctx.config.strategy)
    metrics["timings"] = dict(ctx.timings)
    metrics["info"] = result.info
    if ctx.extract_stats:
        metrics["extraction"] = ctx.extract_stats
    return metrics


class Classifier(ClassifierViews):
    """A trained model: predict, evaluate, save; its figures, card and report come from
    :class:`~transferlab.evaluation.card.ClassifierViews`. Build with ``fit`` or ``load``."""

    def __init__(self, saved: SavedModel) -> None:
        self.saved = saved
        self.metrics: dict[str, Any] = {}
        self.history: list[dict] = []
        self.data_summary: dict[str, Any] = {}
        self.run_dir: Path | None = None  # the run folder it was saved to or loaded from
        self.inputs: dict[str, Any] | None = None  # the input manifest (see provenance)
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
            backbone = self.saved.backbone()
            cfg = dict(self.saved.config)
            # The training machine's cache folder is used when it is here too (a re-evaluation
            # then hits it); a model moved to another machine uses this machine's default.
            if not (cfg.get("cache_dir") and os.access(cfg["cache_dir"], os.W_OK)):
                cfg["cache_dir"] = None
            cfg.update(engine=engine, batch_size=batch_size, workers=workers)
            self._extractor = feature_extractor(backbone, cfg)
        return self._extractor

    def _head_probs(self, features: np.ndarray) -> np.ndarray:
        return softmax(head_logits(self, features), self.saved.temperature)

    def predict_proba_split(self, split: Split) -> np.ndarray:
        ex = self.extractor()
        with progress(len(split), "predicting") as advance:
            got = ex(split.paths, split.digests, on_progress=advance)
        if got.failures:
            path, reason = got.failures[0]
            raise TransferlabError(f"{path}: {reason}")
        return self._head_probs(got.features)

    def evaluate(
        self,
        data: str | os.PathLike,
        *,
        split: str = "test",
        tta: str | bool | None = None,
        calibrate: bool = False,
        config: FitConfig | None = None,
        prepared: PreparedData | None = None,
    ) -> dict[str, Any]:
        """Metrics on one split of ``data``, discovered and scanned as ``fit`` does with the
        model's seed and fractions (or ``config``'s; ``prepared``: that scan, done already).

        Returns the classification report. ``calibrate=True`` fits the temperature on val (the
        model uses it from then on; ``save`` stores it) and adds ``"calibration"``;
        ``tta="flip"|"flip5crop"`` adds ``"tta"``: the split scored with test-time augmentation.
        """
        if prepared is None:
            cfg = config.to_dict() if config is not None else self.saved.config
            prepared = prepare_run_data(data, cfg, self.classes)
        return evaluate_split(self, prepared, split, tta=tta, calibrate=calibrate)

    def iter_predict(
        self, sources: Sequence[str | os.PathLike] | str, *, batch_size: int = 32
    ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """Stream (source, probabilities or None, error or None) over anything ``predict``
        takes, in constant memory for folders and globs; unreadable inputs yield an error."""
        from transferlab.predict import PredictionEngine
        from transferlab.predict.inputs import predict_any

        for p in predict_any(PredictionEngine(self, batch_size=batch_size), sources):
            yield p.path, p.probs, p.error

    def predict(self, x: Any, *, top_k: int = 1, as_frame: bool = False, batch_size: int = 32):
        """Predict a path, folder, glob, PIL image, NumPy array (H, W[, C]) uint8 or float in
        [0, 1], torch tensor (C, H, W) / (N, C, H, W), raw bytes, or a list mixing them.

        One picture gives one :class:`~transferlab.predict.results.ImagePrediction` (label,
        probability, top_k, probs); a folder, glob, batch or list gives a list of them, in
        order. Unreadable inputs get ``error`` instead of a label. ``as_frame=True``: a pandas
        DataFrame, one row per input. Every input is decoded and preprocessed as files are.
        """
        from transferlab.predict.inputs import is_single
        from transferlab.predict.results import Predictions, make_result, ranked_count, to_frame

        ranked_count(top_k, len(self.classes))  # a bad top_k fails before any image is read
        preds = Predictions(
            make_result(src, probs, err, self.classes, top_k)
            for src, probs, err in self.iter_predict(x, batch_size=batch_size)
        )
        if as_frame:
            return to_frame(preds)
        return preds[0] if is_single(x) and len(preds) == 1 else preds

    def predict_proba(self, x: Any, *, batch_size: int = 32) -> np.ndarray:
        """Probabilities (n, C) in ``classes`` order, one row per picture in ``x`` (anything
        ``predict`` takes); an unreadable input raises, as scikit-learn would."""
        rows = []
        for src, probs, err in self.iter_predict(x, batch_size=batch_size):
            if probs is None:
                raise TransferlabError(f"{src}: {err}")
            rows.append(probs)
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), np.float32)

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the run folder ``out``: model, records, provenance.json, and files.json last.

        The folder this model was loaded from (or last saved to) is updated in place. Any other
        folder holding a run (or other files) is refused unless ``overwrite``, which replaces it
        whole (built as ``OUT.partial``, swapped in at the end: no old report or predictions
        are left beside the new model)."""
        out = Path(out)
        own = self.run_dir is not None and Path(self.run_dir).is_dir()
        if own and out.is_dir() and out.samefile(self.run_dir):
            return self._write(out)
        check_out_folder(out, replace=overwrite)
        work = partial_dir(out)
        shutil.rmtree(work, ignore_errors=True)  # check_out_folder vouched it is ours
        work.mkdir(parents=True)
        self.run_dir = finish_run(work, out, self._write)
        return self.run_dir

    def _write(self, out: Path) -> Path:
        self.saved.save(out, seal=False)
        if self.metrics:
            write_json(out / METRICS_FILE, self.metrics)
        if self.data_summary:
            write_json(out / DATA_FILE, self.data_summary)
        if self.history:
            write_json(out / HISTORY_FILE, self.history)
        write_provenance(out, self.inputs, self.metrics)
        seal_run(out)
        self.run_dir = out
        return out


def load(path: str | os.PathLike) -> Classifier:
    """Load a saved run folder (safetensors + JSON only; nothing is unpickled or executed).

    Weights or model.json that differ from the digests recorded at save, or a save that did not
    finish, are an error; an edited or unreadable record (metrics/data/history.json) is a
    warning naming it (predict needs only the model and its weights).
    """
    clf = Classifier(SavedModel.load(path))
    require_intact(path, warn)
    clf.run_dir = Path(path)
    clf.inputs = recorded_inputs(path)  # a later save elsewhere keeps the provenance
    for name, attr in (
        (METRICS_FILE, "metrics"),
        (HISTORY_FILE, "history"),
        (DATA_FILE, "data_summary"),
    ):
        try:
            value = read_json(Path(path) / name)
        except TransferlabError as e:
            warn(f"{e}; loaded without it (re-run `transferlab evaluate` to rebuild it)")
            continue
        if value is not None:
            setattr(clf, attr, value)
    return clf


@dataclass
class RunEvaluation:
    """A saved run scored on a dataset: the model, the scanned data, the report (see
    ``Classifier.evaluate``)."""

    classifier: Classifier | ExportedClassifier
    prepared: PreparedData
    report: dict[str, Any]
    split: str  # what was scored: "all" when a whole folder was


def evaluate_run(
    run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "test",
    tta: str | bool | None = None,
    calibrate: bool = False,
) -> RunEvaluation:
    """Evaluate the run folder ``run`` on one split of ``data`` and record what changed.

    With ``calibrate`` the fitted temperature is stored in the run's ``model.json`` (every later
    ``predict``/``serve``/export uses it). Calibration and TTA results on the run's own data
    become part of its record: they are merged into its ``metrics.json`` (and so its report).
    """
    if is_exported_file(run):
        if calibrate or tta not in (None, False, "none"):
            raise TransferlabError(
                f"{run}: --calibrate and --tta need the run folder, not an exported file"
            )
        return RunEvaluation(*evaluate_exported(run, data, split))
    clf = load(run)
    own = fitted_on(clf.data_summary, data)
    # scanned once, as fit scans: unusable files are skipped here and in a report alike. An
    # unsplit folder that is not the run's own is scored whole (evaluation_data); calibrating
    # keeps the splits, since the temperature is fitted on val.
    if calibrate:
        prepared = prepare_run_data(data, clf.saved.config, clf.classes)
    else:
        prepared, split = evaluation_data(
            data, clf.saved.config, clf.classes, split, own_data=own, seen=trained_on(run)
        )
    report = clf.evaluate(data, split=split, tta=tta, calibrate=calibrate, prepared=prepared)
    record = {k: {**report[k], "data": str(data)} for k in ("calibration", "tta") if k in report}
    if calibrate:
        clf.saved.save(run, seal=False)  # model.json now carries the temperature
    if record and own:
        metrics = read_json(Path(run) / METRICS_FILE, {})
        write_json(Path(run) / METRICS_FILE, {**metrics, **record})
    if calibrate or record:
        seal_run(run)  # the run's own changes: its file digests follow them
    return RunEvaluation(classifier=clf, prepared=prepared, report=report, split=split)


__all__ = [
    "Classifier", "RunEvaluation", "evaluate_run", "feature_extractor", "fit", "load",
    "strategy_context",
]  # fmt: skip
