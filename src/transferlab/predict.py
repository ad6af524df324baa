"""One prediction engine for the CLI, the Python API and the HTTP server.

    sources (files, folders, globs) ─ lazy walk ─ chunks of paths ─ iter_decoded (worker processes)
        ─ body on its fastest runtime ─ head + softmax (temperature) ─ rows written per batch

Memory stays flat on any folder size: folders are walked with ``os.scandir`` one directory
entry at a time (never a full file list; order is the filesystem's, stable for an unchanged
tree), globs with ``glob.iglob``, and at most ``chunk_size`` paths are held at once. Results are
flushed after every batch, so an interrupted run loses at most one batch and ``resume=True``
continues it: paths already in the output are skipped (a torn last line is cut off first), so
every path ends up in the output exactly once.

The server uses the same engine through :meth:`PredictionEngine.decode` /
:meth:`PredictionEngine.infer` (uploads go through the same ``load_image`` geometry and guards
as files on disk), and ``predict_images`` is the in-memory entry point for Python callers.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from transferlab.data.images import IMAGE_EXTENSIONS, load_image
from transferlab.errors import ImageError, TransferlabError

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "FORMATS",
    "UNKNOWN",
    "Prediction",
    "PredictionEngine",
    "RunSummary",
    "iter_sources",
    "read_done",
]

#: The label given when the top probability is below ``threshold``.
UNKNOWN = "unknown"
#: Output formats: csv / jsonl are streamed and resumable; json (one array) is streamed only.
FORMATS = ("csv", "jsonl", "json")
#: Paths decoded per ``iter_decoded`` call (one worker pool): big enough that starting the pool
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


# --------------------------------------------------------------------------------------------
# sources


def iter_sources(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
) -> Iterator[str]:
    """Files as given, folders recursively (image extensions, no hidden files), globs expanded.

    Every source is checked up front (a typo fails before hours of work, not after); the files
    themselves are produced lazily, one directory entry at a time.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    plan: list[tuple[str, str]] = []
    for src in map(os.fspath, sources):
        if os.path.isdir(src):
            plan.append(("dir", src))
        elif os.path.isfile(src):
            plan.append(("file", src))
        elif glob.has_magic(src):
            plan.append(("glob", src))
        else:
            raise TransferlabError(f"{src}: no such file or folder")
    return _iter_plan(plan)  # a generator: nothing is listed until the caller asks


def _iter_plan(plan: list[tuple[str, str]]) -> Iterator[str]:
    for kind, src in plan:
        if kind == "file":
            yield src
        elif kind == "dir":
            yield from _walk(src)
        else:
            matched = False
            for m in glob.iglob(src, recursive=True):
                if os.path.isfile(m):
                    matched = True
                    yield m
            if not matched:
                from transferlab.progress import warn

                warn(f"{src}: the pattern matches no file")


def _walk(root: str) -> Iterator[str]:
    """Image files under ``root``, depth first, holding one open directory per level."""
    stack = [os.scandir(root)]
    try:
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop().close()
                continue
            if entry.name.startswith("."):
                continue
            try:
                # Symlinked folders are not entered (like Path.rglob): a link to a parent would
                # loop forever. Symlinked files are followed.
                if entry.is_dir(follow_symlinks=False):
                    stack.append(os.scandir(entry.path))
                elif (
                    entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                ):
                    yield entry.path
            except OSError:
                continue  # an unreadable sub-folder or a dangling link: nothing to predict there
    finally:
        for it in stack:
            it.close()


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --------------------------------------------------------------------------------------------
# the engine


class PredictionEngine:
    """A classifier's body runtime + head, fed by the shared decoder.

    ``batch_size``: images per inference call. ``workers``: decode processes (None: the
    classifier's extractor setting, i.e. every core for a loaded model; 0: decode in this
    process). ``threshold``: label :data:`UNKNOWN` when the top probability is below it.
    ``max_pixels``: decompression-bomb limit (None: the model's config).
    """

    def __init__(
        self,
        classifier: Classifier,
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
        # Shared with the classifier (same runtime, built once); its settings are left alone.
        self._extractor = classifier.extractor(batch_size=batch_size)
        self.workers = self._extractor.workers if workers is None else workers
        self.max_pixels = int(max_pixels or self._extractor.max_pixels)

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    @property
    def preprocess(self):  # -> Preprocess
        return self.classifier.saved.preprocess

    def warm_up(self) -> str:
        """Build the runtime now (export + parity check) instead of on the first request."""
        h, w = self.preprocess.input_size
        self.infer(np.zeros((1, 3, h, w), dtype=np.uint8))
        return self._extractor.runtime.engine

    # -- tensors ---------------------------------------------------------------------------

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) at the model's input size → probabilities (n, C), float32."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
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
            buf = io.BytesIO()
            # PNG keeps every mode losslessly (alpha included); level 1 is the cheapest useful.
            item.save(buf, format="PNG", compress_level=1)
            return load_image(buf.getvalue(), pre, max_pixels=self.max_pixels)
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
        k = max(1, min(int(k), len(self.classes)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.classes[i], float(probs[i])) for i in order]

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
        self,
        sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        skip: Container[str] = (),
    ) -> Iterator[list[Prediction]]:
        """Predictions one decoded batch at a time, in source order (failures in place)."""
        from transferlab.data.loader import iter_decoded

        paths = (p for p in iter_sources(sources) if p not in skip)
        for chunk in _chunks(paths, self.chunk_size):
            for batch in iter_decoded(
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

    def iter_predict(
        self,
        sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        skip: Container[str] = (),
    ) -> Iterator[Prediction]:
        """One :class:`Prediction` per source file, streamed in constant memory."""
        for batch in self.iter_batches(sources, skip=skip):
            yield from batch

    def run(
        self,
        sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
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
        fmt = _resolve_format(path, fmt)
        k = max(1, min(int(top_k), len(self.classes)))
        if path is None and resume:
            raise TransferlabError("--resume needs --output FILE (.csv or .jsonl)")
        if resume and fmt == "json":
            raise TransferlabError("--resume works with .csv or .jsonl output, not .json")
        done: set[str] = set()
        if path is not None and path.exists() and path.stat().st_size > 0:
            if resume:
                done = read_done(path, fmt, header=_csv_header(k))
            elif not overwrite:
                raise TransferlabError(
                    f"{path}: already exists; pass --resume to continue that run or "
                    "--overwrite to replace it"
                )
        report = on_error or print_error
        summary = RunSummary(resumed=len(done), output=str(path) if path else None)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fh: IO[str] = stack.enter_context(
                    path.open("a" if done else "w", newline="", encoding="utf-8")
                )
            else:
                fh = stream or sys.stdout
            writer = _make_writer(fmt, fh, k, fresh=not done)
            for batch in self.iter_batches(sources, skip=done):
                for pred in batch:
                    if pred.probs is None:
                        summary.failed += 1
                        if len(summary.failures) < 1000:
                            summary.failures.append((pred.path, pred.error or ""))
                        report(pred.path, pred.error or "")
                    else:
                        summary.predicted += 1
                    writer.write(self.row(pred, k))
                fh.flush()  # the resume granularity: one batch
                if on_batch:
                    on_batch(len(batch))
            writer.close()
            fh.flush()
            if path is not None:
                os.fsync(fh.fileno())
        summary.seconds = time.perf_counter() - t0
        return summary


# --------------------------------------------------------------------------------------------
# output files


def _resolve_format(path: Path | None, fmt: str | None) -> str:
    if fmt is None:
        if path is None:
            return "jsonl"
        fmt = path.suffix.lower().lstrip(".") or "jsonl"
        if fmt == "ndjson":
            fmt = "jsonl"
    if fmt not in FORMATS:
        raise TransferlabError(f"output format {fmt!r} is not one of: {', '.join(FORMATS)}")
    return fmt


def _csv_header(k: int) -> list[str]:
    # label/probability is the decision (may be "unknown"); label1..k/prob1..k the ranking.
    return [
        "path",
        "label",
        "probability",
        *[f for i in range(1, k + 1) for f in (f"label{i}", f"prob{i}")],
    ]


def print_error(path: str, reason: str) -> None:
    from transferlab.progress import console

    console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False, soft_wrap=True)


class _Writer:
    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _JsonlWriter(_Writer):
    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class _JsonWriter(_Writer):
    """One JSON array, still written row by row (resume is not possible for it)."""

    def __init__(self, fh: IO[str]) -> None:
        super().__init__(fh)
        self.first = True
        fh.write("[")

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(("\n  " if self.first else ",\n  ") + json.dumps(row, ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        self.fh.write("\n]\n" if not self.first else "]\n")


class _CsvWriter(_Writer):
    def __init__(self, fh: IO[str], k: int, fresh: bool) -> None:
        super().__init__(fh)
        self.k = k
        self.csv = csv.writer(fh, lineterminator="\n")
        if fresh:
            self.csv.writerow(_csv_header(k))

    def write(self, row: dict[str, Any]) -> None:
        if "error" in row:
            return  # CSV keeps results only; the error went to stderr
        ranked = [v for lab, p in row["top_k"] for v in (lab, f"{p:.6f}")]
        self.csv.writerow([row["path"], row["label"], f"{row['probability']:.6f}", *ranked])


def _make_writer(fmt: str, fh: IO[str], k: int, *, fresh: bool) -> _Writer:
    if fmt == "csv":
        return _CsvWriter(fh, k, fresh)
    if fmt == "json":
        return _JsonWriter(fh)
    return _JsonlWriter(fh)


def read_done(
    path: str | os.PathLike[str], fmt: str, *, header: list[str] | None = None
) -> set[str]:
    """Paths already in an output file, after cutting off a torn (unterminated) last line.

    A run killed mid-write leaves at most one partial line at the end: it is truncated away so
    appended rows start on a line of their own, and that path is predicted again.
    """
    path = Path(path)
    _truncate_torn_tail(path)
    done: set[str] = set()
    with path.open(newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            reader = csv.reader(fh)
            first = next(reader, None)
            if first is None:
                return done
            if header is not None and first != header:
                raise TransferlabError(
                    f"{path}: its columns ({','.join(first)}) differ from this run's "
                    f"({','.join(header)}); resume with the same --top-k or use a new --output"
                )
            for row in reader:
                if row:
                    done.add(row[0])
            return done
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise TransferlabError(
                    f"{path}:{n}: not a prediction row; is this the output of a predict run?"
                ) from None
    return done


def _truncate_torn_tail(path: Path) -> None:
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline; everything after it is the torn line.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            data = fh.read(pos - start)
            cut = data.rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)
