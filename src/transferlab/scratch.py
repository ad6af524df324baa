"""The tutorial's from-scratch CNNs, as bodies: images -> the last hidden vector (512-d).

The output layer is not part of the body: it is the head (``heads.build_head``), exactly as for a
pretrained backbone, so every strategy produces the same ``ClassifierNet(body, head)`` shape and
the same saved-model format.

Recipes are JSON (stored in ``model.json``)::

    {"kind": "scratch", "name": "basic" | "regularized", "input_size": [H, W]}

``basic``        Conv 16 -> 64 -> 128 (3x3, ReLU, 'valid'), each + MaxPool 2x2, Flatten,
                 Dense 512 + ReLU.
``regularized``  Conv 16 -> 64 -> 128 -> 128, each + MaxPool 2x2, Flatten,
                 Dense 512 + ReLU -> Dropout 0.3 -> Dense 512 + ReLU -> Dropout 0.3.

Keras' ``Conv2D`` defaults to 'valid' padding and ``MaxPooling2D`` floors, which the layer sizes
here reproduce (150x150 -> 17x17x128 for ``basic``, 7x7x128 for ``regularized``). A modern
from-scratch baseline (any timm architecture with random init) needs no code here: it is the
``{"kind": "timm", ...}`` recipe built with ``pretrained=False``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from transferlab.errors import TransferlabError

__all__ = ["SCRATCH_MODELS", "ScratchCNN", "build_scratch_body", "scratch_recipe"]

# name -> (conv widths, number of Dense-512 layers, dropout after each dense layer)
SCRATCH_MODELS: dict[str, tuple[tuple[int, ...], int, float]] = {
    "basic": ((16, 64, 128), 1, 0.0),
    "regularized": ((16, 64, 128, 128), 2, 0.3),
}
HIDDEN = 512


class ScratchCNN(nn.Sequential):
    """A Keras-style Sequential CNN ending in the last hidden (ReLU) vector."""

    def __init__(
        self,
        input_size: tuple[int, int],
        convs: tuple[int, ...],
        dense_layers: int,
        dropout: float,
    ) -> None:
        layers: dict[str, nn.Module] = {}  # insertion order = layer order
        h, w = input_size
        channels = 3
        for i, width in enumerate(convs, start=1):
            layers[f"conv{i}"] = nn.Conv2d(channels, width, kernel_size=3)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            channels = width
            h, w = (h - 2) // 2, (w - 2) // 2
            if h < 1 or w < 1:
                raise TransferlabError(
                    f"input size {input_size} is too small for {len(convs)} conv+pool blocks; "
                    "use --image-size 64 or more"
                )
        layers["flatten"] = nn.Flatten()
        width_in = channels * h * w
        for i in range(1, dense_layers + 1):
            layers[f"fc{i}"] = nn.Linear(width_in, HIDDEN)
            layers[f"fc{i}_relu"] = nn.ReLU(inplace=True)
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width_in = HIDDEN
        super().__init__(OrderedDict(layers))
        self.num_features = HIDDEN
        self.flat_features = channels * h * w


def scratch_recipe(name: str, image_size: int) -> dict[str, Any]:
    """The JSON recipe for a tutorial CNN at ``image_size`` x ``image_size``."""
    if name not in SCRATCH_MODELS:
        raise TransferlabError(
            f"unknown scratch model {name!r}; choose one of {', '.join(SCRATCH_MODELS)}"
        )
    return {"kind": "scratch", "name": name, "input_size": [int(image_size), int(image_size)]}


def build_scratch_body(recipe: dict[str, Any]) -> ScratchCNN:
    """A freshly initialised tutorial CNN body for ``recipe`` (see the module docstring)."""
    name = recipe.get("name")
    if name not in SCRATCH_MODELS:
        raise TransferlabError(
            f"unknown scratch model {name!r} in the body recipe; "
            f"expected one of {', '.join(SCRATCH_MODELS)}"
        )
    try:
        h, w = (int(v) for v in recipe["input_size"])
    except (KeyError, TypeError, ValueError):
        raise TransferlabError(
            f"scratch recipe needs input_size [H, W]; got {recipe.get('input_size')!r}"
        ) from None
    convs, dense_layers, dropout = SCRATCH_MODELS[name]
    return ScratchCNN((h, w), convs, dense_layers, dropout)
