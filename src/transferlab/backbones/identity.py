"""What a backbone's features depend on, condensed for the caches: :class:`Backbone` and the
weights hashes behind its :meth:`~Backbone.identity`."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from transferlab.data.images import DECODE_VERSION
from transferlab.preprocess import Preprocess
from transferlab.storage import state_digest

__all__ = ["Backbone", "file_sha256", "loaded_weights_hash", "random_init_hash", "short_name"]


class Backbone:
    """A feature extractor (``num_classes=0``, eval mode) and what its features depend on.

    ``model`` may be given as ``build`` instead, a picklable zero-argument callable run on first
    use of :attr:`model`: a backbone described by its card (:mod:`~.card`) computes its
    identity, recipe and cached features without importing timm or building the network, which
    a run whose features are all cached never needs. ``arch`` is the card's (computed from the
    model when not given), ``recipe`` too (None: not known yet); ``body_file`` holds the model's
    weights as a run's ``body.safetensors`` would (a run copies it rather than building the
    model to save).
    """

    def __init__(
        self,
        spec: str,
        model: nn.Module | None,
        preprocess: Preprocess,
        num_features: int,
        weights_hash: str,
        pretrained: bool,
        *,
        build: Callable[[], nn.Module] | None = None,
        arch: str | None = None,
        recipe: dict[str, Any] | None = None,
        body_file: Path | None = None,
    ) -> None:
        if model is None and build is None:
            raise ValueError("a Backbone needs its model or a way to build it")
        self.spec = spec
        self._model = model
        self._build = build
        self.preprocess = preprocess
        self.num_features = num_features
        self.weights_hash = weights_hash
        self.pretrained = pretrained
        self._arch = arch
        self.recipe = recipe  # how to rebuild the body (model.json's body.recipe), if known
        self.body_file = body_file

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            assert self._build is not None
            self._model = self._build().eval()
        return self._model

    @property
    def built(self) -> bool:
        """Whether the network exists yet (a card's backbone builds it on first use)."""
        return self._model is not None

    @property
    def arch(self) -> str:
        """Digest of the module tree's repr: the architecture the weights are loaded into."""
        if self._arch is None:
            self._arch = hashlib.sha256(repr(self.model).encode()).hexdigest()[:12]
        return self._arch

    def replace(self, **changes: Any) -> Backbone:
        """A copy with some fields changed (``preprocess=`` ...), like dataclasses.replace."""
        fields = {
            "spec": self.spec, "model": self._model, "preprocess": self.preprocess,
            "num_features": self.num_features, "weights_hash": self.weights_hash,
            "pretrained": self.pretrained, "build": self._build, "arch": self._arch,
            "recipe": self.recipe, "body_file": self.body_file,
        }  # fmt: skip
        return Backbone(**{**fields, **changes})

    def identity(self) -> str:
        """``spec|weights_hash|preprocess key|arch-…|decode-N``: what the features depend on.

        The feature-cache namespace and the export cache key. ``create_backbone`` canonicalises
        ``spec`` (absolute ``local-dir:`` path), so two spellings of one folder share it;
        a loaded model rebuilds its Backbone from model.json, so it finds the same entries.
        ``arch`` hashes the module tree's repr: a local-dir config.json whose ``model_args``
        change the network (e.g. ``global_pool: max``) with the same weights file must miss.
        ``decode`` is :data:`~transferlab.data.images.DECODE_VERSION`.
        """
        return (
            f"{self.spec}|{self.weights_hash}|{self.preprocess.key()}"
            f"|arch-{self.arch}|decode-{DECODE_VERSION}"
        )

    def identity_hash(self) -> str:
        """Filename-safe short form of :meth:`identity`: ``<model name>-<sha256 prefix>``."""
        name = short_name(self.spec)
        digest = hashlib.sha256(self.identity().encode()).hexdigest()[:24]
        return f"{_safe_name(name)[:48]}-{digest}"


def short_name(spec: str) -> str:
    """``local-dir:/a/b/mobilenetv2_100.tf_quant_in1k`` → ``mobilenetv2_100.tf_quant_in1k``."""
    return spec.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"


_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per process by (path, size, mtime) so a run hashes once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _hash_lock:
        _hash_memo[key] = digest
    return digest


def random_init_hash(model: nn.Module) -> str:
    """Hash of the actual random weights.

    A constant "random-init" would let two different random models share cached features and
    exports; hashing the tensors keeps them apart (and lets a seeded init hit the cache).
    """
    return f"random-init-{state_digest(model)[:32]}"


def loaded_weights_hash(model: nn.Module) -> str:
    """When the downloaded file can't be found in a local cache, hash what was loaded: a tag
    name alone would keep serving cached features after the hub's weights change."""
    return f"loaded-{state_digest(model)[:32]}"
