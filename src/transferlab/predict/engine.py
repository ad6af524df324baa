"""The prediction engine: a classifier's body runtime + head, fed by the shared decoder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from transferlab.data import loader
from transferlab.data.images import load_image, png_bytes
from transferlab.errors import ImageError, TransferlabError
from transferlab.predict.exported import ExportedClassifier
from transferlab.predict.output import (
    already_done,
    make_writer,
    open_output,
    print_error,
    resolve_format,
)
from transferlab.predict.results import ranked_count, ranking
from transferlab.predict.sources import Sources, chunks, iter_sources

if TYPE_CHECKING:
    from transferlab.api import Classifier
    from transferlab.preprocess import Preprocess

__all__ = ["DEFAULT_CHUNK", "UNKNOWN", "Prediction", "PredictionEngine", "RunSummary"]

#: The label given when the top probability is below ``threshold``.
UNKNOWN = "unknown"
#: Paths decoded per ``iter_decoded`` call (one decode pool): big enough that starting the pool
#: and draining its pipeline at the chunk's end cost little, small enough to bound memory.
DEFAULT_CHUNK = 1024

ImageLike = bytes | bytearray | memoryview | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One source: probabilities over the classes, or the reason it could not be read."""

    path: str
    probs: np.ndarray | None
    error: str | None = None


@dataclass
class RunSummary:
    """What :meth:`PredictionEngine.run` did."""

    predicted: int = 0
    failed: int = 0
    resumed: int = 0  # paths already in the output, skipped
    seconds: float = 0.0
    output: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # first 1000 (path, reason)

    @property
    def images_per_s(self) -> float:
        n = self.predicted + self.failed
        return n / self.seconds if self.seconds > 0 else 0.0

    def count(self, pred: Prediction, on_error: Callable[[str, str], None]) -> None:
        """Count ``pred``; a failure is also kept (the first 1000) and passed to ``on_error``."""
        if pred.probs is None:
            self.failed += 1
            if len(self.failures) < 1000:
                self.failures.append((pred.path, pred.error or ""))
            on_error(pred.path, pred.error or "")
        else:
            self.predicted += 1


class PredictionEngine:
    """A classifier's body runtime + head, fed by the shared decoder.

    ``batch_size``: images per inference call. ``workers``: decode threads (None: the
    classifier's extractor setting, i.e. every core for a loaded model; 0: decode in the
    caller's thread). ``threshold``: label :data:`UNKNOWN` when the top probability is below it.
    ``max_pixels``: decompression-bomb limit (None: the model's config).
    """

    def __init__(
        self,
        classifier: Classifier | ExportedClassifier,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        threshold: float | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        max_pixels: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise TransferlabError("--batch-size must be at least 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise TransferlabError(f"--threshold {threshold} must be between 0 and 1")
        if workers is not None and workers < 0:
            raise TransferlabError("--workers must be 0 or more")
        self.classifier = classifier
        self.batch_size = batch_size
        self.threshold = threshold
        self.chunk_size = max(chunk_size, batch_size)
        if isinstance(classifier, ExportedClassifier):
            self._extractor = None
            self.preprocess: Preprocess = classifier.preprocess
            default_workers, default_pixels = None, classifier.max_pixels
        else:
            # Shared with the classifier (same runtime, built once); its settings left alone.
            self._extractor = classifier.extractor(batch_size=batch_size)
            self.preprocess = classifier.saved.preprocess
            default_workers, default_pixels = self._extractor.workers, self._extractor.max_pixels
        self.workers = default_workers if workers is None else workers
        self.max_pixels = int(max_pixels or default_pixels)

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    def warm_up(self) -> str:
        """Build the runtime now (export + parity check) instead of on the first request."""
        h, w = self.preprocess.input_size
        self.infer(np.zeros((1, 3, h, w), dtype=np.uint8))
        return self.classifier.engine if self._extractor is None else self._extractor.runtime.engine

    # -- tensors ---------------------------------------------------------------------------

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) at the model's input size → probabilities (n, C), float32."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        if self._extractor is None:
            return self.classifier.probs(images)
        features = self._extractor.runtime(images)
        return self.classifier._head_probs(features).astype(np.float32, copy=False)

    def decode(self, item: ImageLike) -> np.ndarray:
        """One image (encoded bytes, a PIL image or a uint8 array) → uint8 (3, H, W).

        Bytes go through exactly the path files take (``load_image``: pixel limit from the
        header, EXIF orientation, alpha over white, the backbone's resize/crop). A uint8 array
        already shaped (3, H, W) at the input size is taken as preprocessed; any other array is a
        picture (H, W[, 3|4]) and, like PIL images, is losslessly re-encoded and decoded so it
        gets the same treatment. Raises ImageError.
        """
        pre = self.preprocess
        h, w = pre.input_size
        if isinstance(item, bytes | bytearray | memoryview):
            return load_image(bytes(item), pre, max_pixels=self.max_pixels)
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8:
                raise ImageError("<array>", f"expected a uint8 array, got {item.dtype}")
            if item.ndim == 3 and item.shape == (3, h, w):
                return np.ascontiguousarray(item)
            if item.ndim == 3 and item.shape[0] == 3 and item.shape[2] not in (3, 4):
                item = item.transpose(1, 2, 0)  # CHW of another size: a picture, channels first
            if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
                raise ImageError("<array>", f"cannot read an image of shape {item.shape}")
            item = Image.fromarray(np.ascontiguousarray(item))
        if isinstance(item, Image.Image):
            return load_image(png_bytes(item), pre, max_pixels=self.max_pixels)
        raise ImageError("<input>", f"cannot read a {type(item).__name__} as an image")

    def predict_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Probabilities (n, C) for in-memory images; raises ImageError on the first bad one."""
        probs = []
        for start in range(0, len(images), self.batch_size):
            batch = [self.decode(im) for im in images[start : start + self.batch_size]]
            probs.append(self.infer(np.stack(batch)))
        if not probs:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(probs)

    # -- labels ----------------------------------------------------------------------------

    def label(self, probs: np.ndarray) -> tuple[str, float]:
        """(label, top probability); the label is UNKNOWN below the threshold."""
        i = int(np.argmax(probs))
        p = float(probs[i])
        if self.threshold is not None and p < self.threshold:
            return UNKNOWN, p
        return self.classes[i], p

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable classes (at most C), most probable first."""
        return ranking(probs, self.classes, k)

    def row(self, pred: Prediction, top_k: int = 1) -> dict[str, Any]:
        """The JSON-able result of one source (``error`` instead of labels when unreadable)."""
        if pred.probs is None:
            return {"path": pred.path, "error": pred.error}
        label, p = self.label(pred.probs)
        return {
            "path": pred.path,
            "label": label,
            "probability": p,
            "top_k": [[lab, q] for lab, q in self.top_k(pred.probs, top_k)],
        }

    # -- streams ---------------------------------------------------------------------------

    def iter_batches(
        self, sources: Sources, *, skip: Container[str] = ()
    ) -> Iterator[list[Prediction]]:
        """Predictions one decoded batch at a time, in source order (failures in place)."""
        paths = (p for p in iter_sources(sources) if p not in skip)
        for chunk in chunks(paths, self.chunk_size):
            for batch in loader.iter_decoded(
                chunk,
                self.preprocess,
                batch_size=self.batch_size,
                workers=self.workers,
                max_pixels=self.max_pixels,
            ):
                out: dict[int, Prediction] = {
                    j: Prediction(chunk[j], None, reason) for j, reason in batch.failures
                }
                if len(batch.indices):
                    probs = self.infer(batch.images)
                    for j, p in zip(batch.indices, probs, strict=True):
                        out[j] = Prediction(chunk[j], p)
                yield [out[j] for j in sorted(out)]

    def iter_predict(self, sources: Sources, *, skip: Container[str] = ()) -> Iterator[Prediction]:
        """One :class:`Prediction` per source file, streamed in constant memory."""
        for batch in self.iter_batches(sources, skip=skip):
            yield from batch

    def run(
        self,
        sources: Sources,
        output: str | os.PathLike[str] | None = None,
        *,
        fmt: str | None = None,
        top_k: int = 1,
        resume: bool = False,
        overwrite: bool = False,
        stream: IO[str] | None = None,
        on_error: Callable[[str, str], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> RunSummary:
        """Predict ``sources`` into ``output`` (csv / jsonl / json by suffix or ``fmt``).

        Rows are flushed after every batch. ``resume``: keep the existing output and skip its
        paths. Without ``output`` rows go to ``stream`` (default stdout). Unreadable files are a
        JSONL/JSON row with ``error``; in CSV they go to ``on_error`` only (default: stderr), so
        a resumed CSV run retries them.
        """
        path = Path(output) if output is not None else None
        fmt = resolve_format(path, fmt)
        k = ranked_count(top_k, len(self.classes))
        done = already_done(path, fmt, k, resume=resume, overwrite=overwrite)
        report = on_error or print_error
        summary = RunSummary(resumed=len(done), output=str(path) if path else None)
        t0 = time.perf_counter()
        with open_output(path, stream, append=bool(done)) as fh:
            writer = make_writer(fmt, fh, k, fresh=not done)
            for batch in self.iter_batches(sources, skip=done):
                for pred in batch:
                    summary.count(pred, report)
                    writer.write(self.row(pred, k))
                fh.flush()  # the resume granularity: one batch
                if on_batch:
                    on_batch(len(batch))
            writer.close()
        summary.seconds = time.perf_counter() - t0
        return summary
