"""transferlab: labelled images -> an evaluated, deployable classifier, by transfer learning.

import transferlab
clf = transferlab.fit("data/", backbone="resnet50.a1_in1k", strategy="features", out="runs/cvd")
clf                                   # a card: backbone, strategy, classes, val/test accuracy
clf.predict("photo.jpg")              # also PIL images, NumPy arrays, tensors, bytes, folders
clf.predict_proba(["a.jpg", "b.jpg"]) # (n, C) in clf.classes order
clf = transferlab.load("runs/cvd")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use so that `import transferlab` (and `transferlab --help`) does not pay for
# torch's import: attribute name -> the module that defines it.
_LAZY = {
    "fit": "transferlab.api",
    "load": "transferlab.api",
    "Classifier": "transferlab.api",
    "evaluate_run": "transferlab.api",
    "FitConfig": "transferlab.config",
    "TransferlabError": "transferlab.errors",
    "ImageError": "transferlab.errors",
    "ImagePrediction": "transferlab.predict.results",
    "Predictions": "transferlab.predict.results",
    "explain": "transferlab.evaluation.explain.figures",
    "feature_maps": "transferlab.evaluation.explain.figures",
    "filters": "transferlab.evaluation.explain.figures",
    "convolve": "transferlab.evaluation.explain.figures",
    "report": "transferlab.evaluation.report.notebook",
    "export_model": "transferlab.export",
    "split_folder": "transferlab.data.split",
    "rank": "transferlab.selection.rank",
    "curve": "transferlab.learning_curve",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next look-up is a plain attribute
        return value
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
