"""What every section shares: the run's files and model, loaded once (lazily where it costs
something), and the collector that keeps a failing section from failing the report."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from markupsafe import Markup

from transferlab.api import Classifier, load
from transferlab.cache import default_cache_dir
from transferlab.data.prepared import PreparedData, Split
from transferlab.errors import TransferlabError
from transferlab.evaluation import run_data, scoring
from transferlab.evaluation.report.render import cached_result, figure_uri, render
from transferlab.model import softmax
from transferlab.runs import AUTO_FILE, DATA_FILE, HISTORY_FILE, METRICS_FILE
from transferlab.storage import read_json

_SPLITS = ("train", "val", "test")


@dataclass
class Section:
    id: str
    title: str
    html: Markup


class Sections:
    """Collects sections; a section that raises is replaced by a notice saying why."""

    def __init__(self) -> None:
        self.built: list[Section] = []
        self.unavailable: list[str] = []
        self.timings: dict[str, float] = {}

    def add(self, sid: str, title: str, build: Callable[[], Mapping[str, Any]]) -> None:
        """Section ``sid``: ``build()`` computes the data that its template (``sid.html``,
        with ``_`` for ``-``) lays out."""
        t0 = time.perf_counter()
        try:
            body = render(f"{sid.replace('-', '_')}.html", **build())
        except Exception as e:  # a report must not die with one section; say what went wrong
            reason = str(e) if isinstance(e, TransferlabError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, TransferlabError) and os.environ.get("TRANSFERLAB_DEBUG"):
                traceback.print_exc()
            self.unavailable.append(f"{title}: {reason}")
            body = render("unavailable.html", reason=reason)
        self.timings[sid] = time.perf_counter() - t0
        self.built.append(Section(sid, title, body))


class RunContext:
    """Everything sections share, loaded once (lazily where it costs something)."""

    def __init__(
        self,
        run: Path,
        data: str | os.PathLike[str] | None,
        clf: Classifier | None = None,
        prepared: PreparedData | None = None,
    ) -> None:
        self.run = run
        self.data = data
        self.clf: Classifier = clf if clf is not None else load(run)
        self._files: dict[str, Any] = {}
        self._prepared = prepared if data is not None else None
        self._prepared_error: str | None = None
        self._splits: dict[str, Split] | None = None
        self._split_error: str | None = None
        self._recorded: dict[str, Split | TransferlabError] | None = None
        self._digested: set[str] = set()  # recorded splits whose digests were looked up
        self.logits: dict[str, np.ndarray] = {}

    def _json(self, name: str, default: Any) -> Any:
        """A run file, read once; a corrupt one fails the sections that need it, not the
        whole report."""
        if name not in self._files:
            try:
                self._files[name] = read_json(self.run / name)
            except TransferlabError as e:
                self._files[name] = e
        got = self._files[name]
        if isinstance(got, TransferlabError):
            raise got
        return default if got is None else got

    @property
    def metrics(self) -> dict[str, Any]:
        return self._json(METRICS_FILE, {})

    @property
    def cache_dir(self) -> Path:
        """The run's cache folder (the one its features went to)."""
        cache_dir = self.clf.saved.config.get("cache_dir")
        return Path(cache_dir) if cache_dir else default_cache_dir()

    def figure(self, plot: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """``plot(*args, **kwargs)`` as an embedded PNG, kept in the run's cache folder so an
        unchanged figure is never drawn twice."""
        return figure_uri(plot, *args, cache_dir=self.cache_dir, **kwargs)

    def cached(self, parts: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``compute()``, kept in the run's cache folder by a digest of ``parts``."""
        return cached_result(self.cache_dir, parts, compute)

    @property
    def auto(self) -> dict[str, Any]:
        """``auto.json`` of a ``--strategy auto`` run (empty for any other)."""
        return self._json(AUTO_FILE, {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._json(HISTORY_FILE, [])

    @property
    def summary(self) -> dict[str, Any]:
        return self._json(DATA_FILE, {})

    @property
    def classes(self) -> list[str]:
        return self.clf.classes

    def prepared(self) -> PreparedData | None:
        """The dataset given with ``data``, scanned once for the whole report as ``fit`` scans
        (unusable files skipped); None when the report uses the run's recorded images."""
        if self.data is None:
            return None
        if self._prepared is None and self._prepared_error is None:
            try:
                self._prepared = run_data.prepare_run_data(
                    self.data, self.clf.saved.config, self.classes
                )
            except TransferlabError as e:
                self._prepared_error = str(e)
        if self._prepared is None:
            raise TransferlabError(str(self._prepared_error))
        return self._prepared

    def resolve(self, names: Sequence[str], *, digests: bool = True) -> dict[str, Split]:
        """Splits of the given ``data`` (the one scan) or of the run's own ``data.json`` (parsed
        once per report; digests from the scan index, looked up once per split)."""
        if self.data is not None:
            return run_data.resolve_splits(
                self.run, names, classes=self.classes, prepared=self.prepared()
            )
        if self._recorded is None:
            self._recorded = self._recorded_splits()
        for name in names:
            if isinstance(self._recorded.get(name), TransferlabError):
                raise self._recorded[name]
        out: dict[str, Split] = {n: self._recorded[n] for n in names if n in self._recorded}
        lacking = {n: sp for n, sp in out.items() if n not in self._digested}
        if digests and lacking:
            out.update(self._with_digests(lacking))
            self._recorded.update(out)
            self._digested.update(lacking)
        return out

    def digested(self, split: Split) -> Split:
        """``split`` (e.g. a sample of a recorded split) with its images' content digests."""
        if all(split.digests):
            return split
        return self._with_digests({"split": split})["split"]

    def _with_digests(self, splits: dict[str, Split]) -> dict[str, Split]:
        root = self.summary["index"]["root"]
        return run_data.with_digests(splits, root, self.clf.saved.config.get("cache_dir"))

    def _recorded_splits(self) -> dict[str, Split | TransferlabError]:
        """Every split of the run's ``data.json``, without digests; a split whose images are
        gone holds the error, so that only the sections needing it say so."""
        try:
            return dict(
                run_data.resolve_splits(self.run, _SPLITS, classes=self.classes, digests=False)
            )
        except TransferlabError:
            pass  # find out which split: once per split, only when something is missing
        out: dict[str, Split | TransferlabError] = {}
        for name in _SPLITS:
            try:
                out.update(
                    run_data.resolve_splits(self.run, (name,), classes=self.classes, digests=False)
                )
            except TransferlabError as e:
                out[name] = e
        return out

    def splits(self) -> dict[str, Split]:
        """val/test with digests (for the feature cache); raises if the images are gone."""
        if self._splits is None and self._split_error is None:
            try:
                self._splits = self.resolve(("val", "test"))
            except TransferlabError as e:
                self._split_error = str(e)
        if self._splits is None:
            raise TransferlabError(f"the run's images are not available ({self._split_error})")
        return self._splits

    def eval_split(self) -> str:
        """The split shown in detail: test when there is one, else val."""
        s = self.splits()
        if "test" in s:
            return "test"
        if "val" in s:
            return "val"
        raise TransferlabError("the run has neither a test nor a val split")

    def split_logits(self, name: str) -> np.ndarray:
        if name not in self.logits:
            self.logits[name] = scoring.split_logits(self.clf, self.splits()[name])
        return self.logits[name]

    def probs(self, name: str, temperature: float | None = None) -> np.ndarray:
        """Probabilities of a split at ``temperature`` (default: the model's own)."""
        t = self.clf.saved.temperature if temperature is None else temperature
        return softmax(self.split_logits(name), t)
