"""Shared synthetic-image fixtures: tiny, deterministic, made in tmp_path (no real data needed).

Use ``from conftest import make_image`` for one-off files, and the ``tiny_dataset`` fixture for a
ready ``root/{train,val,test}/{a,b}/*.jpg`` tree whose classes differ by colour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Class colours of tiny_dataset: a is reddish, b is bluish, far apart after any resize/JPEG.
TINY_COLOURS = {"a": (200, 40, 40), "b": (40, 60, 200)}
TINY_COUNTS = {"train": 4, "val": 2, "test": 2}


def make_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] = (32, 24),
    mode: str = "RGB",
    fmt: str | None = None,
    *,
    color: tuple[int, int, int] | None = None,
    seed: int = 0,
    **save_kwargs: Any,
) -> Path:
    """Write a synthetic image of ``size`` (w, h) in Pillow ``mode``; return its path.

    Any mode Pillow converts RGB to works ("L", "P", "RGBA", "CMYK", "1", "F", ...); "I;16" gets
    full-range 16-bit values.

    Without ``color`` the picture is a smooth gradient with mild noise (photo-like enough for
    resize comparisons); with it, a flat colour plus the same noise. ``fmt`` defaults to the
    format implied by the suffix; ``save_kwargs`` go to ``Image.save`` (quality, exif, ...).
    Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    if color is None:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        base = np.stack(
            [
                128 + 90 * np.sin(x / max(w, 1) * 6 + c) * np.cos(y / max(h, 1) * 4 - c)
                for c in range(3)
            ],
            axis=-1,
        )
    else:
        base = np.broadcast_to(np.asarray(color, dtype=np.float64), (h, w, 3))
    rgb = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode.startswith("I;16"):  # real 16-bit range (×257), not 8-bit values in a 16-bit container
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt, **save_kwargs)
    return path


TINY_BACKBONE = "mobilenetv2_035"  # random init: no network, ~0.4 M parameters


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test reads or writes the user's cache (scan index, figures, backbone cards): one
    cache for the session, unless a test sets its own."""
    old = os.environ.get("TRANSFERLAB_CACHE")
    os.environ["TRANSFERLAB_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("TRANSFERLAB_CACHE", None)
    else:
        os.environ["TRANSFERLAB_CACHE"] = old


def tiny_fit_options(tmp_path: Path) -> dict[str, Any]:
    """``fit`` options for a fast offline run: a tiny random backbone, eager torch, no workers."""
    return {
        "backbone": TINY_BACKBONE, "pretrained": False, "engine": "torch", "workers": 0,
        "cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """``root/{train,val,test}/{a,b}/`` with 4/2/2 JPEGs per class (varied sizes, RGB)."""
    root = tmp_path / "tiny"
    seed = 0
    for split, n in TINY_COUNTS.items():
        for label, colour in TINY_COLOURS.items():
            for i in range(n):
                seed += 1  # every file different, so no accidental cross-split duplicates
                name = f"{label}_{split}_{i}.jpg"
                make_image(
                    root / split / label / name, (40 + 4 * i, 32 + 2 * i), color=colour, seed=seed
                )
    return root
