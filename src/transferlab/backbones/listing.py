"""``transferlab backbones``: the local-dir folders and timm pretrained tags one could use."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from transferlab.backbones import hub, search
from transferlab.backbones.create import LOCAL_PREFIX, local_weights_file, read_config
from transferlab.errors import TransferlabError

__all__ = ["BackboneInfo", "list_backbones", "with_params"]


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``transferlab backbones``; ``name`` is always a valid ``--backbone`` spec."""

    name: str
    pretrained: bool
    offline: bool  # usable without a network connection right now
    source: str
    input_size: tuple[int, int] | None = None  # (h, w) the weights were trained at
    params: int | None = None  # filled by with_params (it costs a model build for timm names)


def list_backbones(
    filter: str | None = None,  # noqa: A002 - public keyword name fixed by the CLI contract
    *,
    weights_dirs: Sequence[Path] = (),
) -> list[BackboneInfo]:
    """Local-dir folders (offline) first, then timm pretrained tags matching ``filter``.

    ``filter`` is a substring or a glob (``*`` / ``?``), case-insensitive. Local folders come from
    ``weights_dirs`` and the weights search path (:mod:`.search`); a folder counts when it, or one
    of its direct subfolders, holds a config.json.
    """
    pattern = _glob_of(filter)
    return _local_infos(weights_dirs, pattern) + _timm_infos(pattern)


def _local_infos(weights_dirs: Sequence[Path], pattern: str | None) -> list[BackboneInfo]:
    infos: list[BackboneInfo] = []
    seen: set[Path] = set()
    for folder in search.local_folders(weights_dirs):
        if folder in seen:
            continue
        seen.add(folder)
        arch, pcfg = "", {}
        with contextlib.suppress(TransferlabError):  # listed anyway; create_backbone explains
            config = read_config(folder / "config.json")
            arch = str(config.get("architecture", ""))
            pcfg = dict(config.get("pretrained_cfg") or {})
        if pattern and not (
            fnmatch.fnmatch(folder.name.lower(), pattern) or fnmatch.fnmatch(arch.lower(), pattern)
        ):
            continue
        # the short name works as --backbone when the search path finds this very folder by it
        short = search.find_local(folder.name) == folder
        infos.append(
            BackboneInfo(
                name=folder.name if short else f"{LOCAL_PREFIX}{folder}",
                pretrained=local_weights_file(folder) is not None,
                offline=True,
                source=f"{folder} ({arch or 'unknown architecture'})",
                input_size=_hw(pcfg.get("input_size")),
            )
        )
    return infos


def _timm_infos(pattern: str | None) -> list[BackboneInfo]:
    import timm

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
                input_size=_hw(cfg.get("input_size")),
            )
        )
    return infos


def _glob_of(filter_: str | None) -> str | None:
    if not filter_:
        return None
    f = filter_.strip().lower()
    return f if any(c in f for c in "*?[") else f"*{f}*"


def _hw(input_size: Sequence[int] | None) -> tuple[int, int] | None:
    """timm's (C, H, W) -> (H, W)."""
    return (int(input_size[-2]), int(input_size[-1])) if input_size else None


def with_params(infos: Sequence[BackboneInfo]) -> list[BackboneInfo]:
    """``infos`` with parameter counts, from each architecture (and a local folder's config.json
    model args and class count) built on the meta device."""
    out = []
    for info in infos:
        params = None
        with contextlib.suppress(Exception):  # a count is a nicety: never fail the listing
            params = _count_params(info.name)
        out.append(replace(info, params=params))
    return out


def _count_params(name: str) -> int:
    import timm

    folder = Path(name[len(LOCAL_PREFIX) :]) if name.startswith(LOCAL_PREFIX) else None
    folder = folder or search.find_local(name)
    kwargs: dict[str, Any] = {}
    if folder is not None:
        config = read_config(folder / "config.json")
        name = str(config.get("architecture", ""))
        kwargs = {
            **(config.get("model_args") or {}),
            "num_classes": config.get("num_classes", 1000),
        }
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())
