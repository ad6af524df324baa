"""The run folder: every file name a run or a ladder writes, and how a model is saved and loaded.

A saved model is a folder of plain files, loadable without executing code:

    model.json          classes, preprocessing, body recipe, head spec, strategy, seed, versions
    body.safetensors    the body's weights (always copied, so a model never depends on the
                        folder or hub it was trained from; ~9 MB for MobileNetV2)
    head.safetensors    the head's weights
    metrics.json, data.json, history.json, history.csv, checkpoints/, curves.png, report.html,
    predictions.csv     written beside them by fit, evaluate and report (as applicable)

The body's *identity* (spec + weights hash + preprocessing; see ``Backbone.identity``) is
recorded: an untouched pretrained body keeps the identity of the weights it came from, so
features cached at training time are reused by ``evaluate`` and ``report`` after loading (which
then never build the network), and its exported graph by ``predict``.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from transferlab.backbones import Backbone
from transferlab.config import FitConfig
from transferlab.engine import BEST_CKPT, CHECKPOINT_DIR, HISTORY_CSV, LAST_CKPT
from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.model import ClassifierNet, LazyNet, build_body
from transferlab.preprocess import Preprocess
from transferlab.provenance import seal_run, unseal_run
from transferlab.run_schema import check_head_shapes, validate_model_meta
from transferlab.storage import (
    atomic_copy,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    tensor_shapes,
    write_json,
)
from transferlab.system import library_versions

__all__ = [
    "AUTO_FILE", "BEST_CKPT", "BODY_FILE", "CHECKPOINT_DIR", "COMPARE_FILE", "COMPARE_PNG",
    "CURVES_PNG", "DATA_FILE", "FORMAT_VERSION", "HEAD_FILE", "HISTORY_CSV", "HISTORY_FILE",
    "LADDER_FILE", "LADDER_MD", "LADDER_PNG", "LAST_CKPT", "METRICS_FILE", "MODEL_FILE",
    "PREDICTIONS_FILE", "REPORT_FILE", "SavedModel", "is_run_dir", "read_run_json",
]  # fmt: skip

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
BODY_FILE = "body.safetensors"
HEAD_FILE = "head.safetensors"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.json"
CURVES_PNG = "curves.png"
REPORT_FILE = "report.html"
PREDICTIONS_FILE = "predictions.csv"
LADDER_FILE = "ladder.json"
AUTO_FILE = "auto.json"  # fit --strategy auto: what it tried, what each scored, why it chose
# A run is built in OUT.partial (checkpoints included) and renamed to OUT when it is complete:
# a crash, Ctrl-C or full disk never leaves a half run in OUT nor replaces a finished one.
PARTIAL_SUFFIX = ".partial"
INCOMPLETE_FILE = "incomplete.json"  # in OUT.partial: what was started and how to resume it
LADDER_MD = "ladder.md"
LADDER_PNG = "ladder.png"
COMPARE_FILE = "compare.json"
COMPARE_PNG = "compare.png"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder written by ``fit`` (it holds ``model.json``)."""
    return (Path(path) / MODEL_FILE).is_file()


def check_out_folder(out: str | os.PathLike, *, replace: bool) -> None:
    """Refuse, before any work, an ``--out`` that would lose or mix data: a file, a folder
    holding something else, another run or an interrupted one with checkpoints (unless
    ``replace``: --overwrite or --resume)."""
    out, work = Path(out), partial_dir(out)
    ours = any((work / name).exists() for name in (INCOMPLETE_FILE, MODEL_FILE, CHECKPOINT_DIR))
    if work.exists() and not ours and any(work.iterdir()):
        raise TransferlabError(  # not ours: never removed or written into
            f"{work} exists and is not an interrupted transferlab run; move it away or give "
            "another --out (nothing written)"
        )
    if not replace and (work / CHECKPOINT_DIR).is_dir():
        raise TransferlabError(
            f"{incomplete_note(out)}; or pass --overwrite to start over (nothing written)"
        )
    if out.exists() and not out.is_dir():
        raise TransferlabError(
            f"--out {out} is a file; give a folder for the run (nothing written)"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (is_run_dir(out) or (out / CHECKPOINT_DIR).is_dir()):
        raise TransferlabError(
            f"--out {out} holds other files, not a transferlab run; give a new or empty folder, "
            f"e.g. {next_free(out)} (nothing written)"
        )
    if not replace:
        raise TransferlabError(
            f"--out {out} holds a run already; write to {next_free(out)}, or pass --overwrite to "
            "replace it (--resume to continue an interrupted one)"
        )


def next_free(out: Path) -> Path:
    """``runs/fit`` → ``runs/fit2``, ``runs/fit3``, …: the first name not taken (as Ultralytics
    numbers its runs)."""
    stem = out.name.rstrip("0123456789") or out.name
    n = 2
    while (out.parent / f"{stem}{n}").exists():
        n += 1
    return out.parent / f"{stem}{n}"


def partial_dir(out: str | os.PathLike) -> Path:
    """Where the run for ``out`` is built: ``runs/x`` → ``runs/x.partial``."""
    out = Path(out)
    return out.parent / f"{out.name}{PARTIAL_SUFFIX}"


def begin_run(out: str | os.PathLike, data: str | os.PathLike, config: FitConfig) -> Path:
    """The partial folder to build the run in, marked incomplete with the command that resumes
    it. ``--resume`` continues what is there (a finished run, or one from before partial
    folders, moves there first); otherwise any leftover starts over (check_out_folder has
    refused already when it held checkpoints and --overwrite was not given)."""
    out, work = Path(out), partial_dir(out)
    if not config.resume and work.exists():
        shutil.rmtree(work)
    if config.resume and not work.exists() and (out / CHECKPOINT_DIR).is_dir():
        os.rename(out, work)
    work.mkdir(parents=True, exist_ok=True)
    data_abs, out_abs = str(Path(data).resolve()), str(out.resolve())
    write_json(
        work / INCOMPLETE_FILE,
        {
            "out": out_abs,
            "data": data_abs,
            "resume": shlex.join(
                ["transferlab", "fit", data_abs, "--out", out_abs, *config.cli_flags(), "--resume"]
            ),
            "resume_python": f"transferlab.fit({data_abs!r}, out={out_abs!r}, ..., resume=True)",
        },
    )
    return work


def finish_run(work: Path, out: str | os.PathLike, save: Callable[[Path], Any]) -> Path:
    """``save`` the run into ``work`` (unmarked first, so the seal does not vouch for the
    marker), then rename it to ``out``; a run it replaces (--overwrite) is removed only now, so
    until this moment the old one stays whole."""
    out = Path(out)
    (work / INCOMPLETE_FILE).unlink(missing_ok=True)
    save(work)
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def incomplete_note(path: str | os.PathLike) -> str | None:
    """For a run folder that is (or whose OUT.partial is) an interrupted run: where it is and
    the command that resumes it; None when there is none."""
    path = Path(path)
    for folder in (path, partial_dir(path)):
        marked = (folder / INCOMPLETE_FILE).is_file()
        if marked or ((folder / CHECKPOINT_DIR).is_dir() and not is_run_dir(folder)):
            try:
                marker = read_json(folder / INCOMPLETE_FILE) or {}
            except TransferlabError:
                marker = {}
            resume = marker.get("resume") or f"transferlab fit DATA --out {path} --resume"
            return f"{folder} is an interrupted run, not finished; resume with: {resume}"
    return None


def read_run_json(run: str | os.PathLike, name: str, default: Any = None) -> Any:
    """One of a run folder's JSON files; ``default`` when it is missing (unreadable: an error)."""
    return read_json(Path(run) / name, default)


class SavedModel:
    """Everything ``model.json`` records, plus the network: a
    :class:`~transferlab.model.LazyNet` is built on first use of :attr:`net` (:attr:`head_net`
    and :meth:`save` do without it)."""

    def __init__(
        self,
        net: ClassifierNet | LazyNet,
        classes: list[str],
        preprocess: Preprocess,
        body: dict[str, Any],  # spec, weights_hash, recipe, trained (bool)
        head: dict[str, Any],  # head spec (see heads.build_head)
        strategy: str,
        config: dict[str, Any] | None = None,
        temperature: float = 1.0,
        versions: dict[str, str] | None = None,
    ) -> None:
        self._net = net
        self.classes = classes
        self.preprocess = preprocess
        self.body = body
        self.head = head
        self.strategy = strategy
        self.config = config if config is not None else {}
        self.temperature = temperature
        self.versions = versions if versions is not None else library_versions()

    @property
    def net(self) -> ClassifierNet:
        if isinstance(self._net, LazyNet):
            self._net = self._net.eval()
        return self._net

    @property
    def head_net(self) -> nn.Module:
        """The head alone (a lazy network's body is not built for it)."""
        return self._net.head

    def backbone(self) -> Backbone:
        """The body as a :class:`Backbone`, the feature cache's key for it. Its network is
        :attr:`net`'s body, built on first use: model.json records the arch, so a model whose
        features are all cached never builds it (a run saved before the arch was recorded
        builds it to compute the arch)."""
        lazy = isinstance(self._net, LazyNet)
        return Backbone(
            spec=self.body["spec"],
            model=None,
            build=functools.partial(_net_body, self),  # a partial, not a lambda: picklable
            preprocess=self.preprocess,
            num_features=int(self.head["in_features"]),
            weights_hash=self.body["weights_hash"],
            pretrained=not self.body.get("trained", False),
            arch=self.body.get("arch"),
            recipe=self.body.get("recipe"),
            body_file=self._net.body_file if lazy else None,
        )

    def save(self, out: str | os.PathLike, *, seal: bool = True) -> Path:
        """Write model.json and the weights; ``seal``: then record every run file's digest
        (``Classifier.save`` seals once, after the records it adds)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        unseal_run(out)  # a save that stops midway must not leave a seal over mixed files
        if isinstance(self._net, LazyNet):  # the body's weights are a file already
            target = out / BODY_FILE
            # Onto itself (a run saved where it was loaded from) a copy would give the file a
            # new identity, and the lazy body would then refuse it as replaced.
            if not (target.exists() and target.samefile(self._net.body_file)):
                atomic_copy(self._net.body_file, target)
        else:
            save_tensors(self._net.body.state_dict(), out / BODY_FILE)
        save_tensors(self._net.head.state_dict(), out / HEAD_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "body": self.body,
            "head": self.head,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "config": self.config,
            "versions": self.versions,
        }
        atomic_write_text(out / MODEL_FILE, json.dumps(meta, indent=2, default=str))
        if seal:
            seal_run(out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavedModel:
        """The run at ``path``. The body is built (timm imported, the network constructed) on
        first use of :attr:`net`: a report or an evaluation served by the feature cache never
        needs it. Its weights file's header and length are checked now (a truncated or foreign
        file fails here); weights that do not fit the recipe fail at the build, and so does a
        file replaced since the load (an --overwrite re-fit of the folder)."""
        path = Path(path)
        meta = _read_meta(path)
        head = build_head(meta["head"])
        _load_weights(head, path / HEAD_FILE, "head")
        body_file = (path / BODY_FILE).resolve()  # a later chdir must not change the file
        tensor_shapes(body_file)
        body = functools.partial(load_body, meta["body"]["recipe"], body_file, _file_id(body_file))
        return cls(
            net=LazyNet(body, head.eval(), body_file),
            classes=list(meta["classes"]),
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            body=meta["body"],
            head=meta["head"],
            strategy=meta["strategy"],
            config=meta.get("config", {}),
            temperature=float(meta.get("temperature", 1.0)),
            versions=meta.get("versions", {}),
        )


def _net_body(saved: SavedModel) -> nn.Module:
    return saved.net.body


def load_body(recipe: dict[str, Any], weights: Path, file_id: tuple[int, ...]) -> nn.Module:
    """A saved body: built from its recipe, then given the weights of its file, which must be
    the file that was loaded (``file_id``: its size, mtime and inode then)."""
    try:
        same = _file_id(weights) == file_id
    except OSError:
        same = False
    if not same:
        raise TransferlabError(
            f"{weights}: changed or removed since the run was loaded (re-fitted with "
            "--overwrite?); load the run again"
        )
    body = build_body(recipe)
    _load_weights(body, weights, "body.recipe")
    return body.eval()


def _file_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _load_weights(module: nn.Module, path: Path, described_by: str) -> None:
    try:
        module.load_state_dict(load_tensors(path))
    except RuntimeError as e:  # missing/unexpected keys or shapes: the file and model.json disagree
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TransferlabError(
            f"{path}: weights do not fit the network model.json's {described_by} describes "
            f"({first}); the run folder is inconsistent: re-run fit or restore the folder"
        ) from None


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / MODEL_FILE
    if not meta_path.is_file():
        raise TransferlabError(
            incomplete_note(path)
            or f"{path}: not a transferlab model folder (no {MODEL_FILE}); "
            "pass the --out folder of a `transferlab fit` run"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, too deep
        raise TransferlabError(f"{meta_path}: unreadable model description ({e})") from e
    if not isinstance(meta, dict):
        raise TransferlabError(f"{meta_path}: not a model description (expected a JSON object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TransferlabError(
            f"{meta_path}: format version {meta.get('format_version')} is not supported "
            f"by this transferlab (expects {FORMAT_VERSION})"
        )
    # Types, ranges, class count vs head, no paths outside the folder; then the head weights'
    # shapes against the spec, from the safetensors header (no weights are read).
    validate_model_meta(meta, meta_path)
    check_head_shapes(build_head(meta["head"]), path / HEAD_FILE)
    return meta
