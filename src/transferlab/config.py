"""Typed run configuration: one dataclass that the CLI fills and every run records as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from transferlab.errors import TransferlabError

DEFAULT_BACKBONE = "local-dir:../shared/weights/mobilenetv2_100.tf_quant_in1k"


@dataclass
class FitConfig:
    """Every knob of ``fit``. Defaults are the recommended recipe, not placeholders."""

    # what to train
    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    strategy: str = "features"
    head: str = "linear"
    seed: int = 42
    # data
    label_regex: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    strict: bool = False
    max_pixels: int = 89_478_485
    class_weight: str | None = None  # None or "auto" (inverse frequency)
    # feature extraction
    engine: str = "auto"  # auto | openvino | onnxruntime | torch
    cache_dir: str | None = None
    batch_size: int = 32
    workers: int | None = None
    # end-to-end training (frozen / finetune / scratch strategies)
    epochs: int | None = None  # None: the strategy's default
    lr: float | None = None
    optimizer: str = "adamw"  # adamw | sgd | rmsprop
    schedule: str = "cosine"  # cosine | onecycle | step | constant
    warmup_epochs: float = 0.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    patience: int | None = 5
    max_time: float | None = None  # seconds
    augment: str | None = None  # none | tutorial | light | strong; None: the strategy's default
    unfreeze: str = "2"  # number of top stages, or "all"
    lr_mult: float = 0.1  # body LR = head LR * lr_mult
    gradual: bool = False
    bn: str = "frozen"  # frozen | train
    image_size: int | None = None  # scratch CNNs (tutorial: 150)
    accelerator: str = "cpu"
    devices: int | str = 1
    dist_strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    resume: bool = False

    def validate(self) -> FitConfig:
        from transferlab.heads import HEADS
        from transferlab.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise TransferlabError(
                f"--strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}"
            )
        if self.head not in HEADS:
            raise TransferlabError(
                f"--head {self.head!r} is unknown; choose one of {', '.join(HEADS)}"
            )
        if self.class_weight not in (None, "auto", "none"):
            raise TransferlabError("--class-weight takes 'auto' or 'none'")
        if self.class_weight == "none":
            self.class_weight = None
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise TransferlabError("--val-fraction and --test-fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise TransferlabError("--val-fraction + --test-fraction must leave images to train on")
        if self.batch_size < 1:
            raise TransferlabError("--batch-size must be at least 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
