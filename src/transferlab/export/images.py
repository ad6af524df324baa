"""Real images for the parity batch, int8 calibration and the int8 accuracy check.

From a dataset folder given explicitly (scanned as ``fit`` scans it, with the run's split
settings) or else from the dataset the run recorded in ``data.json``, when still on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.data.discover import DatasetIndex
from transferlab.data.images import load_image
from transferlab.errors import ImageError
from transferlab.evaluation.run_data import prepare_run_data
from transferlab.runs import DATA_FILE, read_run_json

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = ["ImageSource"]

_NOISE_IMAGES = 3


class ImageSource:
    """Real images of the run's dataset (or ``data``), decoded with the model's preprocessing."""

    def __init__(self, clf: Classifier, run_dir: Path | None, data: Any) -> None:
        self.clf = clf
        self.samples: dict[str, list[tuple[str, int]]] = {}
        self.origin = "none"
        if data is not None:
            self._from_data(data)
        else:
            summary = clf.data_summary or (read_run_json(run_dir, DATA_FILE) if run_dir else None)
            if summary and "index" in summary:
                self._from_summary(summary)

    def _from_data(self, data: Any) -> None:
        # The run's splits on that folder, scanned as fit scans it: unusable files are
        # reported and skipped, never fed to calibration or the accuracy check.
        prepared = prepare_run_data(data, self.clf.saved.config, self.clf.classes)
        for name, split in prepared.splits.items():
            self.samples[name] = [
                (p, int(y)) for p, y in zip(split.paths, split.labels, strict=True)
            ]
        self.origin = str(data)

    def _from_summary(self, summary: dict[str, Any]) -> None:
        try:
            index = DatasetIndex.from_dict(summary["index"])
        except Exception:
            return  # an old/foreign data.json: no images
        self.origin = f"the run's dataset ({index.root})"
        classes = list(self.clf.classes)
        for s in index.samples:
            if s.label in classes and os.path.isfile(s.path):
                self.samples.setdefault(s.split, []).append((s.path, classes.index(s.label)))

    def split(self, *names: str) -> list[tuple[str, int]]:
        """The first of ``names`` that has images on disk; empty when none has."""
        for name in names:
            if self.samples.get(name):
                return self.samples[name]
        return []

    def decode(self, items: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, 3, H, W) images and their labels; undecodable files are left out."""
        pre = self.clf.saved.preprocess
        arrays, labels = [], []
        for path, label in items:
            try:
                arrays.append(load_image(path, pre))
            except ImageError:
                continue  # skipped at fit time too
            labels.append(label)
        h, w = pre.input_size
        if not arrays:
            return np.zeros((0, 3, h, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        return np.stack(arrays), np.asarray(labels, dtype=np.int64)

    def parity_batch(self, n_real: int = 8) -> np.ndarray:
        """Real images (every class, when on disk) plus noise: an odd batch size on purpose."""
        pool = self.split("test", "val", "train")
        step = max(1, len(pool) // n_real)
        real, _ = self.decode(pool[::step][:n_real])
        h, w = self.clf.saved.preprocess.input_size
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, size=(_NOISE_IMAGES, 3, h, w), dtype=np.uint8)
        return np.concatenate([real, noise])

    def calibration(self, n: int) -> np.ndarray:
        """Up to ``n`` images spread over the val split (or train without one)."""
        pool = self.split("val", "train")
        step = max(1, len(pool) // max(1, n))
        images, _ = self.decode(pool[::step][:n])
        return images
