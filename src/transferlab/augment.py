"""Augmentation presets on torchvision transforms v2: PIL RGB image -> normalized float tensor.

Every preset starts from the backbone's own preprocessing (:class:`~transferlab.preprocess.
Preprocess`: size, interpolation, crop_pct, mean/std), so a training view and an evaluation view
always share geometry conventions and normalization.

``none``      the eval transform: resize the shorter side to ``floor(size / crop_pct)``, centre
              crop ``size``, normalize (what ``data.images.load_image`` + normalize computes).
``tutorial``  the Keras tutorial's ``ImageDataGenerator(zoom_range=0.3, rotation_range=50,
              width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
              horizontal_flip=True, fill_mode='nearest')`` applied to the eval-size image:
              rotation ±50°, shift ±20 % of each side, shear ±0.2° (Keras 2 reads ``shear_range``
              in *degrees*: ``np.deg2rad(shear)`` in ``apply_affine_transform``, so it is nearly a
              no-op there too), zoom ``1/1.3 .. 1/0.7`` (Keras' zoom factor scales the sampling
              grid, so 1.3 shows *more* of the image), bilinear, horizontal flip. Closest v2
              equivalents, documented: Keras draws x and y zoom independently while
              ``RandomAffine`` zooms isotropically; v2 has no ``fill_mode='nearest'``, so the image
              is edge-padded (``Pad(padding_mode='edge')``, which is exactly Keras' nearest fill,
              ``aaaa|abcd|dddd``) by one image size on every side before the affine warp and centre
              cropped after it; only the extreme corners of the most extreme draws can still reach
              the constant fill beyond the padding.
``light``     ``RandomResizedCrop(size, scale=(0.35, 1))`` + horizontal flip (fastai's fine-tuning
              default crop scale; small data sets lose too much with timm's 0.08).
``strong``    ``RandomResizedCrop(size, scale=(0.08, 1))`` + flip + ``TrivialAugmentWide`` +
              ``RandomErasing(p=0.25)`` (erased pixels take the mean colour: 0 once normalized).

``build_transform(..., normalize=False)`` stops at a uint8 ``(3, H, W)`` tensor (same geometry,
same random draws): the frozen strategy feeds those to the fast feature runtime, and previews
show them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from transferlab.config import AUGMENT_PRESETS
from transferlab.data.images import MAX_PIXELS, open_rgb
from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode, v2

__all__ = ["PRESETS", "augment_preview", "build_transform", "draft_size", "normalizer"]

PRESETS = AUGMENT_PRESETS

# timm's interpolation names, which are torchvision's InterpolationMode values
_INTERPOLATION = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# Keras tutorial parameters (see module docstring for how each maps onto v2).
_TUTORIAL_ROTATION = 50.0
_TUTORIAL_SHIFT = 0.2
_TUTORIAL_SHEAR_DEG = 0.2
_TUTORIAL_ZOOM = 0.3
_LIGHT_SCALE = (0.35, 1.0)
_STRONG_SCALE = (0.08, 1.0)
_ERASE_P = 0.25


def build_transform(
    preset: str, preprocess: Preprocess, *, train: bool, normalize: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> float tensor ``(3, H, W)`` normalized with ``preprocess`` mean/std.

    ``train=False`` always gives the eval transform, whatever the preset. With
    ``normalize=False`` the result is the uint8 tensor just before normalization.
    """
    # torchvision costs ~1 s to import (torch._dynamo behind it): imported when a transform is
    # built, so a run whose features are all cached never pays it
    from torchvision.transforms import v2

    if preset not in PRESETS:
        raise TransferlabError(
            f"--augment {preset!r} is unknown; choose one of {', '.join(PRESETS)}"
        )
    interp = _interpolation(preprocess)
    size = list(preprocess.input_size)
    if not train or preset == "none":
        geometry = _eval_geometry(preprocess, interp)
    elif preset == "tutorial":
        geometry = _eval_geometry(preprocess, interp) + _tutorial_affine(preprocess)
    elif preset == "light":
        geometry = [
            v2.RandomResizedCrop(size, scale=_LIGHT_SCALE, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            v2.RandomResizedCrop(size, scale=_STRONG_SCALE, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.TrivialAugmentWide(interpolation=interp),
        ]
    steps: list[Callable] = [*geometry, v2.ToImage()]
    if train and preset == "strong":
        # On uint8, before normalization, with the mean colour: identical to erasing with 0 after
        # normalization, and the uint8 path (normalize=False) sees the same pixels.
        mean_u8 = [round(255 * m) for m in preprocess.mean]
        steps.append(v2.RandomErasing(p=_ERASE_P, value=mean_u8))
    if normalize:
        steps.append(normalizer(preprocess))
    return v2.Compose(steps)


def normalizer(preprocess: Preprocess) -> v2.Compose:
    """uint8 image tensor(s) -> float32 normalized with the preprocessing's mean/std."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
        ]
    )


def draft_size(preprocess: Preprocess) -> tuple[int, int]:
    """The smallest decoded size every preset needs: JPEGs may be draft-decoded down to it."""
    side = max(preprocess.resize_size)
    return side, side


def _interpolation(preprocess: Preprocess) -> InterpolationMode:
    from torchvision.transforms import InterpolationMode

    if preprocess.interpolation in _INTERPOLATION:
        return InterpolationMode(preprocess.interpolation)
    raise TransferlabError(
        f"interpolation {preprocess.interpolation!r} is unsupported; "
        f"use one of {sorted(_INTERPOLATION)}"
    )


def _eval_geometry(preprocess: Preprocess, interp: InterpolationMode) -> list[Callable]:
    from torchvision.transforms import v2

    rh, rw = preprocess.resize_size
    if preprocess.crop_mode == "squash":
        resize = v2.Resize([rh, rw], interpolation=interp, antialias=True)
    elif rh == rw:
        resize = v2.Resize(rh, interpolation=interp, antialias=True)  # shorter side, as timm
    else:
        raise TransferlabError(
            f"non-square input size {preprocess.input_size} with crop_mode "
            f"{preprocess.crop_mode!r} is not supported by the augmentation presets"
        )
    return [resize, v2.CenterCrop(list(preprocess.input_size))]


def _tutorial_affine(preprocess: Preprocess) -> list[Callable]:
    from torchvision.transforms import InterpolationMode, v2

    h, w = preprocess.input_size
    pad_h, pad_w = h, w
    # RandomAffine's translate is a fraction of the (padded) image: scale it back to the image.
    tx = _TUTORIAL_SHIFT * w / (w + 2 * pad_w)
    ty = _TUTORIAL_SHIFT * h / (h + 2 * pad_h)
    return [
        v2.Pad([pad_w, pad_h], padding_mode="edge"),
        v2.RandomAffine(
            degrees=_TUTORIAL_ROTATION,
            translate=(tx, ty),
            scale=(1 / (1 + _TUTORIAL_ZOOM), 1 / (1 - _TUTORIAL_ZOOM)),
            shear=_TUTORIAL_SHEAR_DEG,
            interpolation=InterpolationMode.BILINEAR,
        ),
        v2.CenterCrop([h, w]),
        v2.RandomHorizontalFlip(),
    ]


def augment_preview(
    image_path: str | os.PathLike[str],
    preset: str,
    n: int,
    out_png: str | os.PathLike[str],
    preprocess: Preprocess,
    *,
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
) -> Path:
    """Write a one-row grid: the eval view of ``image_path`` followed by ``n`` augmented views.

    Seeded (a private RNG stream, the caller's global state is untouched), so the same call draws
    the same picture.
    """
    if n < 1:
        raise TransferlabError("augment preview needs at least one view (n >= 1)")
    image = open_rgb(image_path, max_pixels=max_pixels)
    original = build_transform("none", preprocess, train=False, normalize=False)(image)
    augment = build_transform(preset, preprocess, train=True, normalize=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = [augment(image) for _ in range(n)]
    tiles = [("original", original)] + [(f"{preset} #{i + 1}", v) for i, v in enumerate(views)]
    h, w = preprocess.input_size
    gap, label_h = 6, 16
    grid = Image.new("RGB", (len(tiles) * (w + gap) - gap, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (label, tile) in enumerate(tiles):
        x = i * (w + gap)
        grid.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (x, label_h))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
