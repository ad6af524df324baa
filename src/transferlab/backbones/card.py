"""A built backbone's card: what its features depend on, remembered per weights folder.

Building a backbone means importing timm (with torchvision and torch._dynamo behind it, ~1.5 s on
a 2-core box) and constructing the network, yet a run whose features are all cached uses neither:
it needs the backbone's identity (the cache namespace), preprocessing, feature width and recipe,
and for the run folder the body's weights. The first build of a ``local-dir:`` folder writes them
to ``<cache>/backbones/<key>.json`` and ``<key>.safetensors``; later runs get a
:class:`~.identity.Backbone` from the card that builds its network only when something needs it
(an image not in the cache, fine-tuning, Grad-CAM).

The key covers everything the card's content comes from: the resolved folder, config.json's
bytes, the weights file's identity on disk (path, size, mtime_ns, inode) and the versions of
timm, torch and transferlab. Any change is a miss and a fresh build; a damaged card is a miss
too. Only pretrained ``local-dir:`` folders have cards (a registry name or hub repo resolves its
files through timm; random weights exist only once built).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from torch import nn

from transferlab.backbones.identity import Backbone
from transferlab.cache import default_cache_dir
from transferlab.preprocess import Preprocess
from transferlab.storage import code_digest, keep_with_tensors, read_with_tensors, value_digest

__all__ = ["CARDS", "card_backbone", "card_key", "read_card", "write_card"]

CARDS = "backbones"  # the cards' folder in the cache
_FORMAT = 2  # 2: the shared keep_with_tensors layout (tensor_bytes)


def card_key(folder: Path, weights_file: Path) -> str | None:
    """The card key of a local-dir folder and the weights file timm loads; None if either
    cannot be read."""
    import transferlab

    try:
        config = (folder / "config.json").read_bytes()
        st = weights_file.stat()
    except OSError:
        return None
    return value_digest(
        config, _FORMAT, str(folder), str(weights_file), st.st_size, st.st_mtime_ns, st.st_ino,
        version("timm"), version("torch"), transferlab.__version__, _code_digest(),
    )[:32]  # fmt: skip


@functools.cache
def _code_digest() -> str:
    """The code that derives a card's content: a change to it (in a checkout, before any
    version bump) is a miss, not a stale card."""
    here = Path(__file__).parent
    return code_digest(here / "create.py", here / "identity.py", here.parent / "preprocess.py")


def _meta_path(key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / CARDS / f"{key}.json"


def read_card(key: str, cache_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The card stored under ``key`` with its body file's path, or None (absent, damaged)."""
    kept = read_with_tensors(_meta_path(key, cache_dir))
    return None if kept is None else {**kept[0], "body_file": kept[1]}


def write_card(
    key: str,
    backbone: Backbone,
    recipe: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
) -> None:
    """Remember a freshly built ``backbone`` (and the ``recipe`` that rebuilds it) under
    ``key`` (best effort: a cache that cannot be written only means the next run builds the
    network again)."""
    card = {
        "spec": backbone.spec,
        "preprocess": backbone.preprocess.to_dict(),
        "num_features": backbone.num_features,
        "weights_hash": backbone.weights_hash,
        "arch": backbone.arch,
        "recipe": recipe,
    }
    keep_with_tensors(_meta_path(key, cache_dir), card, backbone.model.state_dict())


def card_backbone(card: dict[str, Any], build: Callable[[], nn.Module]) -> Backbone:
    """The Backbone a card describes, its network built by ``build`` on first use."""
    return Backbone(
        spec=card["spec"],
        model=None,
        preprocess=Preprocess.from_dict(card["preprocess"]),
        num_features=int(card["num_features"]),
        weights_hash=str(card["weights_hash"]),
        pretrained=True,
        build=build,
        arch=str(card["arch"]),
        recipe=dict(card["recipe"]),
        body_file=card["body_file"],
    )
