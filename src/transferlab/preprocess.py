"""The eval-time preprocessing contract, taken from the backbone's timm data config.

It lives in exactly one place and travels with every saved model and export, so train-time,
predict-time and exported preprocessing can never drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``input_size / crop_pct``, centre-crop ``input_size``, normalize."""

    input_size: tuple[int, int]  # (height, width)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> Preprocess:
        """Build from ``timm.data.resolve_model_data_config(model)``."""
        _, h, w = data_config["input_size"]
        return cls(
            input_size=(int(h), int(w)),
            interpolation=str(data_config.get("interpolation", "bilinear")),
            crop_pct=float(data_config.get("crop_pct") or 1.0),
            crop_mode=str(data_config.get("crop_mode") or "center"),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
        )

    def at_size(self, short_side: int) -> Preprocess:
        """The same preprocessing with the input's shorter side at ``short_side`` (aspect kept,
        crop_pct kept: the crop shows the same share of the image, at more pixels)."""
        h, w = self.input_size
        scale = short_side / min(h, w)
        return replace(self, input_size=(round(h * scale), round(w * scale)))

    @property
    def resize_size(self) -> tuple[int, int]:
        """Size before the crop, as timm's eval transform computes it (floor of size / crop_pct)."""
        h, w = self.input_size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(d["input_size"]),
            interpolation=d["interpolation"],
            crop_pct=float(d["crop_pct"]),
            crop_mode=d.get("crop_mode", "center"),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )

    def key(self) -> str:
        """A stable string identifying this preprocessing, for cache keys."""
        h, w = self.input_size
        return (
            f"{h}x{w}-{self.interpolation}-crop{self.crop_pct:g}-{self.crop_mode}"
            f"-m{','.join(f'{v:g}' for v in self.mean)}-s{','.join(f'{v:g}' for v in self.std)}"
        )
