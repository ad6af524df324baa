"""``transferlab backbones``: the local-dir folders and timm pretrained tags one could use."""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm

from transferlab.backbones import hub
from transferlab.backbones.create import LOCAL_PREFIX, local_weights_file, read_config
from transferlab.errors import TransferlabError

__all__ = ["BackboneInfo", "list_backbones"]


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``transferlab backbones``; ``name`` is always a valid ``--backbone`` spec."""

    name: str
    pretrained: bool
    offline: bool  # usable without a network connection right now
    source: str


def list_backbones(
    filter: str | None = None,  # noqa: A002 - public keyword name fixed by the CLI contract
    *,
    weights_dirs: Sequence[Path] = (),
) -> list[BackboneInfo]:
    """Local-dir folders (offline) first, then timm pretrained tags matching ``filter``.

    ``filter`` is a substring or a glob (``*`` / ``?``), case-insensitive. Local folders come from
    ``weights_dirs`` and ``$TRANSFERLAB_WEIGHTS`` (os.pathsep-separated); a folder counts when it,
    or one of its direct subfolders, holds a config.json.
    """
    pattern = _glob_of(filter)
    return _local_infos(weights_dirs, pattern) + _timm_infos(pattern)


def _local_infos(weights_dirs: Sequence[Path], pattern: str | None) -> list[BackboneInfo]:
    infos: list[BackboneInfo] = []
    seen: set[Path] = set()
    for folder in _local_folders(weights_dirs):
        if folder in seen:
            continue
        seen.add(folder)
        arch = ""
        with contextlib.suppress(TransferlabError):  # listed anyway; create_backbone explains
            arch = str(read_config(folder / "config.json").get("architecture", ""))
        if pattern and not (
            fnmatch.fnmatch(folder.name.lower(), pattern) or fnmatch.fnmatch(arch.lower(), pattern)
        ):
            continue
        infos.append(
            BackboneInfo(
                name=f"{LOCAL_PREFIX}{folder}",
                pretrained=local_weights_file(folder) is not None,
                offline=True,
                source=f"local folder ({arch or 'unknown architecture'})",
            )
        )
    return infos


def _timm_infos(pattern: str | None) -> list[BackboneInfo]:
    infos: list[BackboneInfo] = []
    for name in timm.list_models(pattern or "*", pretrained=True):
        try:
            pcfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            continue
        cfg = pcfg.to_dict() if pcfg is not None else {}
        if cfg.get("hf_hub_id"):
            source = f"hf-hub:{cfg['hf_hub_id']}"
        elif cfg.get("url"):
            source = str(cfg["url"])
        else:
            source = "timm"
        infos.append(
            BackboneInfo(
                name=name,
                pretrained=True,
                offline=hub.cached_weights_file(cfg) is not None,
                source=source,
            )
        )
    return infos


def _glob_of(filter_: str | None) -> str | None:
    if not filter_:
        return None
    f = filter_.strip().lower()
    return f if any(c in f for c in "*?[") else f"*{f}*"


def _local_folders(weights_dirs: Sequence[Path]) -> list[Path]:
    roots = [Path(p) for p in weights_dirs]
    roots += [Path(p) for p in os.environ.get("TRANSFERLAB_WEIGHTS", "").split(os.pathsep) if p]
    found: list[Path] = []
    for root in roots:
        root = root.expanduser()
        if not root.is_dir():
            continue
        if (root / "config.json").is_file():
            found.append(root.resolve())
            continue
        try:
            children = sorted(root.iterdir())
        except OSError:
            continue
        found += [c.resolve() for c in children if (c / "config.json").is_file()]
    return found
