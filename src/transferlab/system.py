"""Facts about the process and the machine it runs on: CPUs, ranks, the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Any


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers set, else cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not available on macOS/Windows
        return os.cpu_count() or 1


def is_rank_zero() -> bool:
    """Under srun, torchrun or Fabric's ddp re-launch every rank runs the whole command; only
    rank 0 writes the run folder and prints. Reads the variables Lightning reads, in its order,
    without importing Lightning on the features path."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_malloc_tuned: bool | None = None


@functools.cache
def glibc() -> Any:
    """glibc through ctypes (``mallopt``, ``malloc_trim``), or None where the C library is
    another (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_glibc_malloc() -> bool:
    """Stop glibc from returning big buffers to the kernel after every eager-PyTorch batch.

    With default thresholds each batch's large activations are mmap'd and unmapped again, costing
    hundreds of thousands of page faults per run (see shared/docs/perf-notes.md). Raising the mmap
    and trim thresholds keeps that memory in the heap for reuse. Returns True when applied; a no-op
    on non-glibc platforms. Process-wide and idempotent.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    libc = glibc()
    if libc is None:
        return False
    # glibc caps the mmap threshold (32 MiB on 64-bit via mallopt); try big, then the cap.
    mmap_ok = any(libc.mallopt(M_MMAP_THRESHOLD, v) == 1 for v in (1 << 30, 1 << 25))
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    _malloc_tuned = bool(mmap_ok and trim_ok)
    return _malloc_tuned


def library_versions() -> dict[str, str]:
    """The versions a run records, so a result can be traced to the code that produced it."""
    from importlib.metadata import version

    import numpy
    import torch

    import transferlab

    return {
        "transferlab": transferlab.__version__,
        "torch": torch.__version__,
        "timm": version("timm"),  # not timm.__version__: importing timm costs ~1.5 s here
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what a seeded run starts with)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
