"""The head modules (``Standardize -> net``), how to rebuild one from its spec, their loss, and
the thread policy of every head fit."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transferlab.config import HEAD_NAMES
from transferlab.errors import TransferlabError

HEADS = HEAD_NAMES
# An ensemble's head (model.EnsembleBody gives it the members' logits): never trained, its
# weights are chosen on val; not a --head choice, so not in HEAD_NAMES.
AVERAGE = "average"

# Torch intra-op threads while a head is fitted (``num_threads``; None leaves torch's setting).
# One: a head fit is thousands of small ops (n x 1280 @ 1280 x C), each ending in an OpenMP
# barrier, and when other processes share the cores every barrier waits for a descheduled
# thread. Measured on 2 cores already shared with other jobs (benchmarks/head_memory.py
# --rows 0 --small 2000 --threads: 2000 x 1280 rows, 10 classes, 13-value grid, medians of 3):
# 1 thread 8.5 s vs torch's default (2) 52 s; next to a `while True: pass` process 17 s vs 94 s.
# One thread also makes the weights independent of the core count. The earlier switch to None
# blamed two SIGSEGVs on this toggle; their cause was OpenVINO's signal stack (commit b886f45,
# runtime.keep_signal_stack), not the toggle. Used by fit_head and the frozen strategy's head.
NUM_THREADS_DEFAULT = 1


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at ``n`` (None: as it is); the previous
    count is restored on exit. Process-wide, so meant for one fit at a time, as the heads do."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    if previous != max(1, int(n)):
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``x``'s memory (a read-only memmap too: the heads only read features)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


@dataclass
class Problem:
    """What a head is fitted on: checked features and labels, the training standardization
    (float64 mean / std) and the per-class loss weights (None: unweighted)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray | None


@dataclass
class FittedHead:
    """A trained head: the module (eval mode, CPU, float32), how to rebuild it, and its history."""

    module: nn.Module
    spec: dict
    history: list[dict] = field(default_factory=list)

    def predict_logits(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Logits for float features ``(n, d)``, as float32 numpy (a convenience for callers)."""
        x = np.asarray(x, dtype=np.float32)
        self.module.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                out.append(self.module(torch.from_numpy(x[start : start + batch_size])).numpy())
        if not out:
            return np.zeros((0, int(self.spec["num_classes"])), dtype=np.float32)
        return np.concatenate(out)


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training statistics kept as buffers (saved in state_dict)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Head(nn.Module):
    """``net(standardize(x))``; the same two attribute names for every kind."""

    def __init__(self, in_features: int, net: nn.Module) -> None:
        super().__init__()
        self.standardize = Standardize(in_features)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def _mlp_net(
    in_features: int, hidden: Sequence[int], dropout: float, num_classes: int
) -> nn.Module:
    layers: list[nn.Module] = []
    prev = in_features
    for width in hidden:
        layers += [nn.Linear(prev, int(width)), nn.ReLU(), nn.Dropout(float(dropout))]
        prev = int(width)
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def build_head(spec: dict) -> nn.Module:
    """An untrained module of the shape ``spec`` describes (load a state_dict into it)."""
    kind = spec.get("kind")
    if kind == AVERAGE:
        return WeightedAverage.from_spec(spec)
    if kind not in HEADS:
        raise TransferlabError(f"head spec has kind {kind!r}; expected one of {', '.join(HEADS)}")
    try:
        d = int(spec["in_features"])
        c = int(spec["num_classes"])
        if kind == "linear":
            net: nn.Module = nn.Linear(d, c)
        else:
            net = _mlp_net(d, spec["hidden"], spec["dropout"], c)
    except KeyError as e:
        raise TransferlabError(f"head spec is missing {e.args[0]!r} (kind {kind!r})") from None
    head = Head(d, net)
    head.eval()
    return head


class WeightedAverage(nn.Module):
    """K members' logits side by side (n, K·C) → log of the weighted average of their softmax
    probabilities (n, C); a softmax of that gives back the average itself."""

    def __init__(self, weights: Sequence[float], num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
        # From the spec in model.json (the JSON records the weights), so not saved as tensors.
        self.register_buffer("log_weights", torch.log(w).view(1, -1, 1), persistent=False)

    @classmethod
    def from_spec(cls, spec: dict) -> WeightedAverage:
        try:
            weights = list(spec["weights"])
            c, d = int(spec["num_classes"]), int(spec["in_features"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransferlabError(f"average head spec: bad or missing {e}") from None
        finite = all(isinstance(w, int | float) and 0 < w < float("inf") for w in weights)
        if not weights or not finite or abs(sum(weights) - 1) > 1e-6 or d != len(weights) * c:
            raise TransferlabError(
                "average head spec: weights must be positive, sum to 1 and number in_features / "
                f"num_classes ({d} / {c}); got {weights}"
            )
        return cls(weights, c).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(x.reshape(x.shape[0], -1, self.num_classes), dim=2)
        return torch.logsumexp(logp + self.log_weights, dim=1)


def weighted_ce(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """sum_i w[y_i] * CE_i / n (not / sum of weights: training.class_weights keeps the scale)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    if weights is not None:
        ce = ce * weights[y]
    return ce.mean()
