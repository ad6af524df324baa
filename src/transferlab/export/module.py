"""What an exported file computes, as an eager PyTorch module: the reference every export is
checked against, and what gets traced."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from transferlab.runtime import Uint8Input

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = ["ExportedModel", "example_input", "exported_module"]

_EXPORT_BATCH = 2  # the trace's dummy batch; the parity batch has another size (dynamic axis)


class ExportedModel(Uint8Input):
    """uint8 RGB (n, 3, H, W) → class probabilities (n, C): what the exported file computes."""

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        temperature: float = 1.0,
    ) -> None:
        super().__init__(net, mean, std)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        if self.temperature != 1.0:  # a constant in the graph; skipped when it changes nothing
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


def exported_module(clf: Classifier) -> ExportedModel:
    """``clf`` as an :class:`ExportedModel` on a float32 copy of its network."""
    saved = clf.saved
    net = copy.deepcopy(saved.net).float().eval()  # the caller's model is left untouched
    pre = saved.preprocess
    return ExportedModel(net, pre.mean, pre.std, saved.temperature).eval()


def example_input(clf: Classifier, n: int = _EXPORT_BATCH) -> torch.Tensor:
    """A zero uint8 batch at the model's input size: what the tracer runs."""
    h, w = clf.saved.preprocess.input_size
    return torch.zeros((n, 3, h, w), dtype=torch.uint8)
