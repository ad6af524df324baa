"""Provenance of a run folder: which input files, on which machine and code, produced it, and
whether the folder and the data are still what they were.

    provenance.json   project version, environment (python, libraries, hardware, threads, the
                      feature engine used) and the input manifest: every image's path relative to
                      the data root, size, sha256 (the scan's digests, not a second read), split
                      and label
    files.json        written last by every save: size + sha256 of each run file. Its absence
                      beside a provenance.json means the save did not finish.

Nothing here writes outside the run folder: the data folder is only read.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.data.discover import path_under
from transferlab.data.images import file_digest
from transferlab.errors import TransferlabError
from transferlab.storage import read_json, write_json
from transferlab.system import available_cpus, library_versions

__all__ = [
    "FILES_FILE", "PROVENANCE_FILE", "RunCheck", "check_run_files", "environment",
    "input_manifest", "recorded_inputs", "require_intact", "seal_run", "trained_on", "unseal_run",
    "verify_data", "write_provenance",
]  # fmt: skip

PROVENANCE_FILE = "provenance.json"
FILES_FILE = "files.json"
# Written after the seal by later commands (report, predict, tracking): listed by verify as
# "not recorded", never as tampering.
_DERIVED = ("report.html", "curves.png", "predictions.csv", "tracking.json")
# runs.MODEL_FILE/BODY_FILE/HEAD_FILE: runs imports this module, so the names are repeated here
# (tests/test_provenance.py checks they agree).
MODEL_FILE = "model.json"
_WEIGHTS = ("body.safetensors", "head.safetensors")
_OPTIONAL_LIBS = ("torchvision", "timm", "lightning", "onnxruntime", "openvino", "mlflow")


def input_manifest(prepared: Any) -> dict[str, Any]:
    """Every usable input image (relative path, size, sha256, split, label) from a
    ``PreparedData``; digests are the scan's, so no file is read twice."""
    index = prepared.index
    base = os.path.dirname(index.root) if index.layout == "csv" else index.root
    files = []
    for split_name, split in prepared.splits.items():
        for path, label, digest in zip(split.paths, split.labels, split.digests, strict=True):
            try:
                size = os.path.getsize(path)
            except OSError:
                size = None
            files.append(
                {
                    "path": _relative(path, base),
                    "size": size,
                    "sha256": digest,
                    "split": split_name,
                    "label": index.classes[int(label)],
                }
            )
    files.sort(key=lambda f: f["path"])
    return {
        "root": str(Path(index.root).resolve()),
        "layout": index.layout,
        "files": files,
        "skipped": [{"path": _relative(p, base), "reason": r} for p, r in prepared.skipped],
    }


def _relative(path: str, base: str) -> str:
    under = path_under(path, base)
    if under is not None:
        return under
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()


def environment(engines: list[str] | None = None) -> dict[str, Any]:
    """Python, library versions, hardware and thread settings of this process."""
    import torch

    libs = dict(library_versions())
    for name in _OPTIONAL_LIBS:
        version = package_version(name)
        if version:
            libs[name] = version
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"name": p.name, "memory_gb": round(p.total_memory / 1e9, 1)})
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": libs,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(),
            "available_cpus": available_cpus(),
            "memory_gb": _memory_gb(),
            "cuda": cuda,
        },
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            **{v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ},
        },
        "engines_used": sorted(set(engines or [])),
    }


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, f"{name}-skinny"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def write_provenance(out: Path, inputs: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
    """provenance.json: project version, environment, and (when known) the input manifest."""
    import transferlab

    engines = [e.get("engine") for e in metrics.get("extraction", []) if e.get("engine")]
    record = {
        "project": {"name": "transferlab", "version": transferlab.__version__},
        "environment": environment(engines),
        "inputs": inputs,
    }
    if inputs is None:  # re-saved without the data at hand: keep what trained it
        record["inputs"] = recorded_inputs(out)
    write_json(out / PROVENANCE_FILE, record)


def _digest(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _run_files(run: Path) -> list[str]:
    names = []
    for p in sorted(run.iterdir()):
        if p.is_file() and p.name != FILES_FILE and p.name not in _DERIVED and ".tmp" not in p.name:
            names.append(p.name)
    return names


def seal_run(run: str | os.PathLike) -> None:
    """files.json: size and sha256 of every run file, written last (a save that stopped early
    leaves none, and ``load`` says so)."""
    run = Path(run)
    write_json(
        run / FILES_FILE,
        {"algorithm": "sha256", "files": {n: _digest(run / n) for n in _run_files(run)}},
    )


def unseal_run(run: str | os.PathLike) -> None:
    """Drop files.json before a save rewrites the folder, so a crash mid-save cannot leave a
    seal that vouches for files it no longer describes."""
    (Path(run) / FILES_FILE).unlink(missing_ok=True)


@dataclass
class RunCheck:
    """The run's own files against files.json."""

    sealed: bool  # files.json present
    half_written: bool = False  # provenance.json without files.json
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.half_written or self.changed or self.missing)


def check_run_files(run: str | os.PathLike) -> RunCheck:
    """Compare the run folder with the digests recorded when it was written."""
    run = Path(run)
    seal = read_json(run / FILES_FILE)
    if seal is None:
        return RunCheck(sealed=False, half_written=(run / PROVENANCE_FILE).is_file())
    recorded: dict[str, Any] = seal.get("files", {})
    check = RunCheck(sealed=True)
    for name, want in sorted(recorded.items()):
        path = run / name
        if not path.is_file():
            check.missing.append(name)
        elif path.stat().st_size != want.get("size") or file_digest(path) != want.get("sha256"):
            check.changed.append(name)
    present = [p.name for p in run.iterdir() if p.is_file() and p.name != FILES_FILE]
    check.unrecorded = sorted(n for n in present if n not in recorded)
    return check


def require_intact(run: str | os.PathLike, warn: Any) -> None:
    """``load``'s check: weights or model.json missing/changed, or a half-written save, is an
    error (the model would not be the one its metrics describe); an edited record
    (metrics.json, data.json, ...) is a warning. Unsealed (older) runs pass."""
    check = check_run_files(run)
    where = f"`transferlab verify {run}` lists every difference"
    if check.half_written:
        raise TransferlabError(
            f"{run}: {FILES_FILE} is missing beside {PROVENANCE_FILE}: the save did not finish "
            f"(half-written run); re-run `transferlab fit` into a new --out"
        )
    bad = [n for n in check.missing + check.changed if n in (*_WEIGHTS, MODEL_FILE)]
    if bad:
        raise TransferlabError(
            f"{run}: {', '.join(bad)} no longer match(es) the digest recorded when the run was "
            f"written (edited, replaced or half-written); {where}"
        )
    rest = [n for n in check.missing + check.changed if n not in bad]
    if rest:
        warn(f"{run}: {', '.join(rest)} changed since the run was written; {where}")


def recorded_inputs(run: str | os.PathLike) -> dict[str, Any] | None:
    """The run's input manifest, or None (none recorded, or provenance.json unreadable:
    ``require_intact`` has said so already)."""
    try:
        return (read_json(Path(run) / PROVENANCE_FILE) or {}).get("inputs")
    except (TransferlabError, AttributeError):
        return None


def trained_on(run: str | os.PathLike) -> set[str]:
    """Content digests of the images a run was trained or validated on (its input manifest)."""
    files = (recorded_inputs(run) or {}).get("files", [])
    return {f["sha256"] for f in files if f.get("split") in ("train", "val") and f.get("sha256")}


@dataclass
class DataCheck:
    """The data folder now against the run's input manifest."""

    root: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    resplit: int = 0  # unchanged files that a fit now would put in another (carved) split

    @property
    def ok(self) -> bool:
        return not (self.added or self.removed or self.changed or self.relabelled)


def verify_data(run: str | os.PathLike, data: str | os.PathLike | None = None) -> DataCheck:
    """Discover ``data`` (default: the root recorded) as the run did and compare every image
    with the manifest: added, removed, changed content, moved to another class/split."""
    from transferlab.data.discover import discover

    run = Path(run)
    prov = read_json(run / PROVENANCE_FILE) or {}
    inputs = prov.get("inputs")
    if not inputs:
        raise TransferlabError(
            f"{run}: no input manifest ({PROVENANCE_FILE} is missing or has none); only runs "
            "written by this version of `transferlab fit` can be checked against their data"
        )
    root = Path(data) if data is not None else Path(inputs["root"])
    if not root.exists():
        raise TransferlabError(
            f"{root}: data folder not found; pass where it is now: transferlab verify RUN DATA"
        )
    cfg = (read_json(run / MODEL_FILE) or {}).get("config", {})
    index = discover(
        root,
        label_regex=cfg.get("label_regex"),
        val_fraction=cfg.get("val_fraction", 0.2),
        test_fraction=cfg.get("test_fraction", 0.2),
        seed=cfg.get("seed", 42),
    )
    base = os.path.dirname(index.root) if index.layout == "csv" else index.root
    now = {_relative(s.path, base): s for s in index.samples}
    then = {f["path"]: f for f in inputs["files"]}
    then.update({f["path"]: None for f in inputs.get("skipped", []) if f["path"] not in then})
    check = DataCheck(root=str(root))
    check.added = sorted(set(now) - set(then))
    check.removed = sorted(p for p in set(then) - set(now) if then[p] is not None)
    for rel in sorted(set(now) & set(then)):
        rec, sample = then[rel], now[rel]
        if rec is None:
            continue
        if _changed(sample.path, rec):
            check.changed.append(rel)
        elif sample.label != rec["label"]:
            check.relabelled.append(rel)
        elif sample.split != rec["split"]:
            # carved splits are drawn from each class's whole pool: adding or removing a file
            # moves others too, so this is counted, not listed as a change of those files
            check.resplit += 1
    return check


def _changed(path: str, rec: dict[str, Any]) -> bool:
    try:
        if rec.get("size") is not None and os.path.getsize(path) != rec["size"]:
            return True
        return file_digest(path) != rec["sha256"]
    except OSError:
        return True
