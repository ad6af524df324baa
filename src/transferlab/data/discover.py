"""Turn whatever the user points at into one index of (path, label, split) rows.

:mod:`~transferlab.data.layouts` finds the labelled files (four layouts); this module carves the
splits the source lacks and keeps the result as a :class:`DatasetIndex`.

Carved splits are stratified and reproducible on any machine: per class, files are sorted (by the
number in ``label.N.ext`` names, else by name), shuffled with ``random.Random(seed)`` and sliced
train, val, test, the procedure the shared datasets' MANIFEST uses. Nothing is silently dropped:
skipped files are listed in ``problems``; anything that makes the data unusable is a
:class:`~transferlab.errors.TransferlabError` naming the path and the fix.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.data.layouts import SPLITS, LabelledFiles, list_labelled
from transferlab.errors import TransferlabError
from transferlab.storage import printable_path

__all__ = [
    "DatasetIndex",
    "Sample",
    "discover",
    "find_cross_split_duplicates",
    "find_duplicates",
    "seeded_order",
]

_KAGGLE_NAME = re.compile(r"[^.]+\.(\d+)\.[^.]+")
_METHOD = (
    "per class: sort (label.N.ext by N, else by name), "
    "random.Random(seed).shuffle, slices train, val, test"
)


@dataclass
class Sample:
    """One labelled image. ``path`` is absolute; ``split`` is "train", "val" or "test"."""

    path: str
    label: str
    split: str


@dataclass
class DatasetIndex:
    """Everything later stages need to know about the data, JSON-able for the run folder."""

    root: str
    layout: str
    classes: list[str]
    samples: list[Sample]
    generated_split: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    # Paths found but not usable (dangling/looping links, unreadable folders, unsupported
    # formats) with the reason, and kept files whose names are not valid UTF-8.
    unusable: list[tuple[str, str]] = field(default_factory=list)
    odd_names: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split, in index order (split, class, file order)."""
        return [s for s in self.samples if s.split == name]

    def has_split(self, name: str) -> bool:
        return any(s.split == name for s in self.samples)

    def counts(self) -> dict[str, dict[str, int]]:
        """split → class → number of images, for every split present and every class."""
        tally = Counter((s.split, s.label) for s in self.samples)
        return {
            split: {c: tally[split, c] for c in self.classes}
            for split in SPLITS
            if self.has_split(split)
        }

    def label_index(self, label: str) -> int:
        """Position of ``label`` in ``classes``: the integer target the model is trained on."""
        try:
            return self.classes.index(label)
        except ValueError:
            raise TransferlabError(
                f"unknown class {label!r}; this dataset has classes {', '.join(self.classes)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; sample paths under the root are stored relative to it (portable)."""
        base = _base_dir(self.root, self.layout)
        return {
            "root": self.root,
            "layout": self.layout,
            "classes": list(self.classes),
            "samples": [
                {"path": _relative(s.path, base), "label": s.label, "split": s.split}
                for s in self.samples
            ],
            "generated_split": copy.deepcopy(self.generated_split),
            "problems": list(self.problems),
            "unusable": [{"path": printable_path(p), "reason": r} for p, r in self.unusable],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetIndex:
        base = _base_dir(d["root"], d["layout"])
        return cls(
            root=d["root"],
            layout=d["layout"],
            classes=list(d["classes"]),
            samples=[
                Sample(_absolute(s["path"], base), s["label"], s["split"]) for s in d["samples"]
            ],
            generated_split=d.get("generated_split"),
            problems=list(d.get("problems", [])),
            unusable=[(u["path"], u["reason"]) for u in d.get("unusable", [])],
        )


@dataclass
class _Carving:
    """Which splits are carved, from which pool (``pool_split`` None: every file of a class)."""

    splits: list[str]
    pool_split: str | None
    fractions: dict[str, float]
    seed: int


def discover(
    source: str | os.PathLike[str],
    *,
    label_regex: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 42,
) -> DatasetIndex:
    """Index a dataset in any supported layout, carving missing val/test splits reproducibly.

    ``val_fraction``/``test_fraction`` are fractions of each class's pool (all files for unsplit
    layouts, the train files when only some splits exist); ``test_fraction=0`` means no test split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise TransferlabError(
            f"val fraction {val_fraction} and test fraction {test_fraction} must each be in [0, 1) "
            "and sum to less than 1"
        )
    found = list_labelled(source, label_regex=label_regex)
    problems = list(found.problems)
    classes = _classes_of(found)
    carving = _plan_carving(found, problems, {"val": val_fraction, "test": test_fraction}, seed)

    by_class: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for path, label, split in found.items:
        by_class[label].append((path, split))
    base = _base_dir(found.root, found.layout)
    samples: list[Sample] = []
    for label in classes:
        samples += _assign_class(found, label, by_class[label], carving, base)

    order = {s: i for i, s in enumerate(SPLITS)}
    class_pos = {c: i for i, c in enumerate(classes)}
    samples.sort(key=lambda s: (order[s.split], class_pos[s.label], _file_key(s.path, base)))
    generated = None
    if carving.splits:
        generated = {
            "from": "train" if carving.pool_split else "all",
            "splits": carving.splits,
            "val_fraction": val_fraction if "val" in carving.splits else None,
            "test_fraction": test_fraction if "test" in carving.splits else None,
            "seed": seed,
            "method": _METHOD,
        }
    return DatasetIndex(
        root=found.root,
        layout=found.layout,
        classes=classes,
        samples=samples,
        generated_split=generated,
        problems=problems,
        unusable=list(getattr(found.problems, "unusable", [])),
        odd_names=list(getattr(found.problems, "odd_names", [])),
    )


def seeded_order(paths: list[str], base: str, seed: int) -> list[str]:
    """The MANIFEST procedure: sort one class's files, then ``random.Random(seed).shuffle``."""
    ordered = sorted(paths, key=lambda p: _file_key(p, base))
    random.Random(seed).shuffle(ordered)
    return ordered


def find_cross_split_duplicates(
    samples: list[Sample], digests: dict[str, str]
) -> list[tuple[Sample, Sample]]:
    """Pairs of byte-identical files in different splits (leakage), earlier split first.

    ``digests`` maps a sample's path to its content hash (:func:`~.images.file_digest`); samples
    without one are skipped, so callers may hash only what they need.
    """
    order = {s: i for i, s in enumerate(SPLITS)}
    pairs = []
    for group in find_duplicates(samples, digests):
        group = sorted(group, key=lambda s: (order.get(s.split, len(order)), s.path))
        for i, a in enumerate(group):
            pairs += [(a, b) for b in group[i + 1 :] if b.split != a.split]
    return pairs


def find_duplicates(samples: list[Sample], digests: dict[str, str]) -> list[list[Sample]]:
    """Groups (2+) of samples with identical content, in any split and with any labels.

    Filter a group by split for within-split repeats; differing labels in one group mean the same
    picture is labelled twice.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        digest = digests.get(s.path)
        if digest is not None:
            groups[digest].append(s)
    return [g for g in groups.values() if len(g) > 1]


# --------------------------------------------------------------------------------------------
# splitting


def _classes_of(found: LabelledFiles) -> list[str]:
    classes = sorted({label for _, label, _ in found.items})
    if len(classes) < 2:
        only = f" {classes[0]!r}" if classes else ""
        raise TransferlabError(
            f"{found.root}: found only one class{only} ({len(found.items)} images); a classifier "
            "needs at least two: add a folder (or file-name label) per class"
        )
    return classes


def _plan_carving(
    found: LabelledFiles, problems: list[str], fractions: dict[str, float], seed: int
) -> _Carving:
    """Carve the val/test splits the source lacks (from train when it has splits, else from all)."""
    present = {split for _, _, split in found.items if split is not None}
    if present:
        _check_split_classes(found, present, problems)
        carve = [s for s in ("val", "test") if s not in present]
        pool_split: str | None = "train"
    else:
        carve = ["val", "test"]
        pool_split = None
    carve = [s for s in carve if fractions[s] > 0]
    return _Carving(carve, pool_split, fractions, seed)


def _assign_class(
    found: LabelledFiles,
    label: str,
    files: list[tuple[str, str | None]],
    carving: _Carving,
    base: str,
) -> list[Sample]:
    """One class's samples: files with a fixed split keep it, the pool is sliced by ``carving``."""
    fixed = [(p, s) for p, s in files if s is not None and s != carving.pool_split]
    pool = [p for p, s in files if s == carving.pool_split]
    samples = [Sample(p, label, s) for p, s in fixed]
    if not carving.splits:
        return samples + [Sample(p, label, "train") for p in pool]
    counts = _carve_counts(len(pool), [carving.fractions[s] for s in carving.splits])
    if counts is None:
        raise _too_small(found, label, len(pool), carving)
    shuffled = seeded_order(pool, base, carving.seed)
    n_train = len(pool) - sum(counts)
    samples += [Sample(p, label, "train") for p in shuffled[:n_train]]
    start = n_train
    for split, n in zip(carving.splits, counts, strict=True):
        samples += [Sample(p, label, split) for p in shuffled[start : start + n]]
        start += n
    return samples


def _carve_counts(n: int, fractions: list[float]) -> list[int] | None:
    """Per-split sizes carved from a class of ``n`` (at least 1 each, 1+ left for train)."""
    counts = [max(1, math.floor(n * f + 0.5)) for f in fractions]
    return counts if n - sum(counts) >= 1 else None


def _too_small(found: LabelledFiles, label: str, n: int, carving: _Carving) -> TransferlabError:
    where = "in train" if carving.pool_split else "in total"
    carve = carving.splits
    shares = " + ".join(f"{carving.fractions[s]:g} {s}" for s in carve)
    return TransferlabError(
        f"{found.root}: class {label!r} has only {n} image(s) {where}, too few to carve "
        f"{' and '.join(carve)} ({shares}); need at least {len(carve) + 1}: add images, "
        "provide val/test folders, or lower the fractions (test fraction 0 = no test split)"
    )


def _check_split_classes(found: LabelledFiles, present: set[str], problems: list[str]) -> None:
    """A class seen in val/test must exist in train; a class missing from val/test is noted."""
    per_split: dict[str, set[str]] = defaultdict(set)
    for _, label, split in found.items:
        per_split[split or "train"].add(label)
    for split in ("val", "test"):
        if split not in present:
            continue
        unknown = sorted(per_split[split] - per_split["train"])
        if unknown:
            raise TransferlabError(
                f"{found.root}: class(es) {', '.join(unknown)} appear in {split} but not in "
                "train; the model cannot learn them: add training images or remove them"
            )
        absent = sorted(per_split["train"] - per_split[split])
        if absent:
            problems.append(f"class(es) with no {split} images: {', '.join(absent)}")


# --------------------------------------------------------------------------------------------
# paths


def _file_key(path: str, base: str) -> tuple[int, int, str, str]:
    """Sort key: Kaggle ids numerically ("cat.2" before "cat.10"), other names as text."""
    name = os.path.basename(path)
    m = _KAGGLE_NAME.fullmatch(name)
    if m:
        return (0, int(m.group(1)), name, _relative(path, base))
    return (1, 0, name, _relative(path, base))


def _base_dir(root: str, layout: str) -> str:
    return os.path.dirname(root) if layout == "csv" else root


def _absolute(stored: str, base: str) -> str:
    """Inverse of :func:`_relative`."""
    return stored if os.path.isabs(stored) else os.path.join(base, *stored.split("/"))


def path_under(path: str, base: str) -> str | None:
    """``path`` relative to ``base`` with "/" separators when it is a normalised absolute path
    inside ``base``, by string alone (os.path.relpath stats the cwd per call: ~0.5 s at 20k
    files); None otherwise."""
    prefix = base.rstrip(os.sep) + os.sep
    if path.startswith(prefix) and os.path.isabs(path) and os.path.normpath(path) == path:
        return path[len(prefix) :].replace(os.sep, "/")
    return None


def _relative(path: str, base: str) -> str:
    """``path`` relative to ``base`` with "/" separators, or unchanged when outside ``base``."""
    under = path_under(path, base)
    if under is not None:
        return under
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return path
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return path
    return Path(rel).as_posix()
