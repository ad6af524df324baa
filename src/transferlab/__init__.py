"""transferlab: labelled images -> an evaluated, deployable classifier, by transfer learning.

import transferlab
clf = transferlab.fit("data/", backbone="resnet50.a1_in1k", strategy="features")
clf.metrics["test"]["accuracy"]; clf.predict(["photo.jpg"], top_k=2); clf.save("runs/cvd")
clf = transferlab.load("runs/cvd")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use so that `transferlab --help` does not pay for torch's import.
_LAZY = {
    "Classifier": "transferlab.api",
    "fit": "transferlab.api",
    "load": "transferlab.api",
    "FitConfig": "transferlab.config",
    "TransferlabError": "transferlab.errors",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
