"""The trained network: a body (pooled features) + a head (logits), and how a body is rebuilt
from the JSON recipe stored with it (the run folder that holds them is :mod:`transferlab.runs`).

An ensemble is the same shape, so every path that runs a single model runs it too: its body
(:class:`EnsembleBody`) maps one image to every member's logits side by side, and its head (the
``"average"`` kind of :func:`transferlab.heads.build_head`) turns those into the log of the
weighted average of the members' probabilities.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.preprocess import Preprocess

ENSEMBLE = "ensemble"  # the body recipe kind of an ensemble


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
    if kind == ENSEMBLE:
        return EnsembleBody([_member(m) for m in recipe["members"]])
    raise TransferlabError(f"unknown body kind {kind!r} in the model's body recipe")


def _member(entry: dict[str, Any]) -> EnsembleMember:
    """An ensemble member from its recipe entry: body recipe, head spec, preprocessing."""
    pre = Preprocess.from_dict(entry["preprocess"])
    return EnsembleMember(build_body(entry["body"]), build_head(entry["head"]), pre)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits ``(n, C)``, in float64: the one softmax every score,
    prediction and calibration goes through (``temperature`` is the model's, see calibrate)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


class EnsembleMember(ClassifierNet):
    """One member of an ensemble: the ensemble's input (float RGB in [0, 1] at the ensemble's
    size) → its own centre crop of that → resized to its own input size → its own mean/std →
    its logits (n, C).

    Each member keeps the normalization it was trained with, so members of different families
    (0.5/0.5 Inception-style, ImageNet mean/std) share one uint8 input. ``window`` (set by
    :class:`EnsembleBody`) is the centred fraction of the input's sides the member keeps, so a
    member whose eval crop is tighter than the ensemble's sees its own crop, not the wider one.
    """

    def __init__(self, body: nn.Module, head: nn.Module, preprocess: Preprocess) -> None:
        super().__init__(body, head)
        self.preprocess = preprocess
        self.input_size = tuple(int(v) for v in preprocess.input_size)
        self.window = 1.0
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # from model.json, not weights
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window < 1.0:
            # Python ints: the ensemble's input size is fixed, so the export slices constants.
            h, w = int(x.shape[-2]), int(x.shape[-1])
            keep_h, keep_w = round(h * self.window), round(w * self.window)
            top, left = (h - keep_h) // 2, (w - keep_w) // 2
            x = x[..., top : top + keep_h, left : left + keep_w]
        if tuple(x.shape[-2:]) != self.input_size:
            # Bilinear without antialiasing: one ONNX Resize that ONNX Runtime and OpenVINO
            # compute as torch does (the shrink is mild: the largest member sets the size).
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return super().forward((x - self.mean) / self.std)


class EnsembleBody(nn.Module):
    """Float RGB in [0, 1] (n, 3, H, W) → every member's logits side by side (n, K·C)."""

    def __init__(self, members: list[EnsembleMember]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        outer = ensemble_preprocess([m.preprocess for m in members])
        for m in members:
            # "center" keeps crop_pct of the image's shorter side: a member with a smaller
            # crop_pct than the ensemble's keeps that share of the ensemble's input.
            if m.preprocess.crop_mode == outer.crop_mode == "center":
                m.window = min(1.0, m.preprocess.crop_pct / outer.crop_pct)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


def ensemble_preprocess(members: list[Preprocess]) -> Preprocess:
    """The ensemble's preprocessing: the geometry of its largest member (the others crop and
    shrink in the network), no normalization (mean 0, std 1: each member normalizes its own
    input)."""
    largest = max(members, key=lambda p: p.input_size[0] * p.input_size[1])
    return Preprocess(
        input_size=largest.input_size,
        interpolation=largest.interpolation,
        crop_pct=largest.crop_pct,
        crop_mode=largest.crop_mode,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


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
        self._building = threading.Lock()  # a server's threads may all ask for it at once

    @property
    def body(self) -> nn.Module:
        return self.eval().body

    def eval(self) -> ClassifierNet:
        with self._building:
            if self._net is None:
                self._net = ClassifierNet(self._make_body(), self.head).eval()
        return self._net
