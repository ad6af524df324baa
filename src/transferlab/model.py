"""The trained network: a body (pooled features) + a head (logits), and how a body is rebuilt
from the JSON recipe stored with it (the run folder that holds them is :mod:`transferlab.runs`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.errors import TransferlabError


class ClassifierNet(nn.Module):
    """Normalized float images (n, 3, H, W) -> logits (n, C)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BN running statistics, no dropout), then each module's own flag.

    Restoring per module (not ``model.train(was_training)``) keeps deliberate mixes intact, e.g.
    a training model whose frozen BatchNorms stay in eval mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def build_body(recipe: dict[str, Any]) -> nn.Module:
    """An untrained body of the right shape, from the JSON recipe stored with the model."""
    kind = recipe.get("kind")
    if kind == "timm":
        import timm

        return timm.create_model(
            recipe["architecture"], pretrained=False, num_classes=0, **recipe.get("model_args", {})
        )
    if kind == "scratch":
        from transferlab.scratch import build_scratch_body

        return build_scratch_body(recipe)
    raise TransferlabError(f"unknown body kind {kind!r} in the model's body recipe")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits ``(n, C)``, in float64: the one softmax every score,
    prediction and calibration goes through (``temperature`` is the model's, see calibrate)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


class LazyNet:
    """A ClassifierNet whose body is built on first use: a features run on a carded backbone
    (:mod:`transferlab.backbones.card`) has its head and the body's weights as a file, and
    needs the body itself only if something runs it (Grad-CAM, an image not in the cache).

    ``body_file`` holds the body's state_dict as a run's ``body.safetensors`` would; saving
    copies it. :meth:`eval` (like ``nn.Module.eval``, which returns the module) gives the built
    network, so ``result.net.eval()`` works on either kind.
    """

    def __init__(self, body: Callable[[], nn.Module], head: nn.Module, body_file: Path) -> None:
        self._make_body = body
        self.head = head
        self.body_file = body_file
        self._net: ClassifierNet | None = None

    @property
    def built(self) -> bool:
        return self._net is not None

    @property
    def body(self) -> nn.Module:
        return self.eval().body

    def eval(self) -> ClassifierNet:
        if self._net is None:
            self._net = ClassifierNet(self._make_body(), self.head).eval()
        return self._net
