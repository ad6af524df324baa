"""Which images a saved run is scored on: its recorded splits, or a dataset folder prepared as
``fit`` prepares it.

Splits of a saved run are rebuilt from its ``data.json`` (no re-scan: the digests needed by the
feature cache come from the dataset's scan index; only files changed since are re-hashed) or,
from a dataset folder given explicitly, by :func:`prepare_run_data`: discovered and
decode-checked exactly as ``fit`` does, so unusable files are reported and skipped instead of
failing the evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.config import FitConfig
from transferlab.data.discover import DatasetIndex
from transferlab.data.prepared import PreparedData, Split, prepare_data
from transferlab.data.scan import file_digests
from transferlab.errors import TransferlabError
from transferlab.progress import info
from transferlab.runs import DATA_FILE, MODEL_FILE, read_run_json

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = [
    "classifier_split", "evaluation_data", "fitted_on", "prepare_run_data", "resolve_splits",
    "with_digests",
]  # fmt: skip


def fitted_on(summary: Mapping[str, Any] | None, data: str | os.PathLike[str]) -> bool:
    """Whether ``data`` is the folder a run was fitted on (the root in its data summary)."""
    root = ((summary or {}).get("index") or {}).get("root")
    return root is not None and Path(data).resolve() == Path(root).resolve()


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


def evaluation_data(
    data: str | os.PathLike[str],
    config: Mapping[str, Any] | None,
    classes: Sequence[str],
    split: str = "test",
    *,
    own_data: bool = False,
    seen: Collection[str] = (),
) -> tuple[PreparedData, str]:
    """The images to score on ``data`` and the name of that split.

    ``split`` of the folder as ``fit`` splits it, except: ``"all"`` scores every usable image of
    every split; and so does the default ``"test"`` on a folder without split folders that is not
    the run's own data — its carved 20% "test" would silently leave most of it unscored (on the
    run's own folder the carved test split is the held-out one, and it is kept). That whole-folder
    score leaves out the images whose content digest is in ``seen`` (those the model was trained
    or validated on: the run's folder copied or moved, or a new folder that shares images with
    it), which would inflate it, and says how many.
    """
    prepared = prepare_run_data(data, config, classes)
    unsplit = (prepared.index.generated_split or {}).get("from") == "all"
    implicit = split == "test" and unsplit and not own_data
    if split != "all" and not implicit:
        return prepared, split
    parts = [prepared.splits[name] for name in ("train", "val", "test") if name in prepared.splits]
    rows = [
        (p, int(y), d)
        for s in parts
        for p, y, d in zip(s.paths, s.labels, s.digests, strict=True)
        if not (implicit and d in seen)
    ]
    whole = Split(
        paths=[p for p, _, _ in rows],
        labels=np.array([y for _, y, _ in rows], dtype=np.int64),
        digests=[d for _, _, d in rows],
    )
    left_out = sum(len(s) for s in parts) - len(whole)
    if not len(whole):
        raise TransferlabError(
            f"{data}: every usable image is one the model was trained or validated on "
            f"({left_out}): nothing held out to score; pass a folder of new images"
        )
    counts = ", ".join(f"{c} {int((whole.labels == i).sum())}" for i, c in enumerate(classes))
    why = " (it has no split folders)" if implicit else ""
    held_out = (
        f"; left out {left_out} image(s) the model was trained or validated on (same content)"
        if left_out
        else ""
    )
    info(f"{data}: scoring all {len(whole)} usable images{why}{held_out}: {counts}")
    return replace(prepared, splits={"all": whole}), "all"
