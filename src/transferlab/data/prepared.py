"""A discovered dataset whose every file was read once: the splits a strategy trains on.

discover (layouts → index) → scan (digest + decode check of every file) → :class:`PreparedData`:
unusable files are reported and skipped (or fail the run with ``strict``), and the same picture
in two splits is reported as leakage. The scan index of the dataset root (under the cache dir)
answers for files unchanged since the last run, so only new or changed ones are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from transferlab.config import FitConfig
from transferlab.data.discover import DatasetIndex, discover, find_cross_split_duplicates
from transferlab.data.scan import scan_files
from transferlab.errors import TransferlabError
from transferlab.progress import info, progress, warn
from transferlab.storage import printable_path

__all__ = ["PreparedData", "Split", "prepare_data"]


@dataclass
class Split:
    """The usable images of one split: paths, integer labels, content digests."""

    paths: list[str]
    labels: np.ndarray
    digests: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class PreparedData:
    """A discovered dataset whose files were all read, digested and decode-checked."""

    index: DatasetIndex
    splits: dict[str, Split]
    skipped: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # same content in two splits: (path_a, path_b)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index.to_dict(),
            "counts": {
                name: {c: int((s.labels == i).sum()) for i, c in enumerate(self.index.classes)}
                for name, s in self.splits.items()
            },
            "skipped": [{"path": printable_path(p), "reason": r} for p, r in self.skipped],
            "cross_split_duplicates": [list(pair) for pair in self.duplicates],
        }


def prepare_data(data: str | os.PathLike, config: FitConfig) -> PreparedData:
    """Discover the layout, then read every file once (see the module docstring)."""
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
            index_root=index.root,
            cache_dir=config.cache_dir,
        )
    bad = dict(scan.failures)
    skipped = list(index.unusable) + [(samples[i].path, reason) for i, reason in scan.failures]
    if config.strict and index.odd_names:
        skipped += [(p, "file name is not valid UTF-8") for p in index.odd_names]
    _report_skipped(skipped, strict=config.strict)
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
    _check_trainable(data, index, splits)
    info(_summary_line(data, index, splits, len(skipped), scan.unchanged))
    return PreparedData(index=index, splits=splits, skipped=skipped, duplicates=duplicates)


def _summary_line(
    data: Any, index: DatasetIndex, splits: dict[str, Split], n_skipped: int, unchanged: int
) -> str:
    """What was found, said before any work is spent on it: counts per split, what was carved,
    how many files the scan index vouched for without reading them."""
    n = sum(len(s) for s in splits.values())
    classes = ", ".join(index.classes)
    line = f"found {n} images in {len(index.classes)} classes ({classes}) in {data}"
    line += ": " + ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    generated = index.generated_split
    if generated:
        carved = [
            f"{name} {generated[f'{name}_fraction']:.0%}"
            for name in generated["splits"]
            if generated.get(f"{name}_fraction") is not None
        ]
        line += f"; carved from {generated['from']} ({', '.join(carved)}, seed {generated['seed']})"
    if n_skipped:
        line += f"; {n_skipped} skipped (listed above)"
    if unchanged:
        n_files = len(index.samples)
        line += f"; {unchanged:,} of {n_files:,} files unchanged since the last check (not read)"
    return line


def _report_skipped(skipped: list[tuple[str, str]], *, strict: bool) -> None:
    if not skipped:
        return
    lines = "\n".join(f"  {printable_path(p)}: {r}" for p, r in skipped[:20])
    more = f"\n  … and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    if strict:
        raise TransferlabError(
            f"{len(skipped)} unusable image(s) (--strict):\n{lines}{more}\n"
            "Fix or remove them, or run without --strict to skip them."
        )
    warn(f"skipped {len(skipped)} unusable image(s):\n{lines}{more}")


def _check_trainable(data: Any, index: DatasetIndex, splits: dict[str, Split]) -> None:
    if "train" not in splits:
        raise TransferlabError(f"{data}: no usable training images")
    missing = [c for i, c in enumerate(index.classes) if not (splits["train"].labels == i).any()]
    if missing:
        raise TransferlabError(
            f"{data}: class(es) {', '.join(missing)} have no usable training images"
        )
