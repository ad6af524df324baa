"""A training job: everything a (possibly spawned) training process needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.config import FitConfig
from transferlab.data.prepared import Split
from transferlab.engine.stages import Stage
from transferlab.preprocess import Preprocess


@dataclass
class Job:
    """Everything a (possibly spawned) training process needs; picklable."""

    train: Split
    val: Split | None
    preprocess: Preprocess
    config: FitConfig
    run_dir: Path
    stages: list[Stage]
    augment: str
    monitor: str
    num_classes: int
    min_epochs: int  # early stopping never stops the run before this many epochs
    caller_pid: int  # a rank in another process hands its weights back through best.ckpt

    def setup(self) -> dict[str, Any]:
        """What the strategy chose beyond the config and the stages (part of the run identity)."""
        return {"augment": self.augment, "monitor": self.monitor, "min_epochs": self.min_epochs}
