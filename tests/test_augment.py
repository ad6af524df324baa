"""Augmentation presets: output size and normalization, seeded variety, the eval path, previews."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import make_image
from transferlab.augment import PRESETS, augment_preview, build_transform, normalizer
from transferlab.data.dataset import DecodeFailure, ImageDataset, collate, raise_if_failed
from transferlab.errors import ImageError, TransferlabError
from transferlab.preprocess import Preprocess

PRE = Preprocess(input_size=(40, 40), crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def photo(tmp_path) -> Image.Image:
    return Image.open(make_image(tmp_path / "p.png", (64, 48))).convert("RGB")


def _draw(transform, image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_give_normalized_tensors_of_the_input_size(preset, photo):
    for train in (True, False):
        x = build_transform(preset, PRE, train=train)(photo)
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32
        assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6  # mean=std=0.5 -> [-1, 1]


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_train_views_differ_across_seeds_and_repeat_within_one(preset, photo):
    t = build_transform(preset, PRE, train=True)
    a, b = _draw(t, photo, 1), _draw(t, photo, 2)
    assert not torch.equal(a, b)
    assert torch.equal(a, _draw(t, photo, 1))


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_transform_ignores_the_preset_and_the_seed(preset, photo):
    ref = build_transform("none", PRE, train=False)(photo)
    t = build_transform(preset, PRE, train=False)
    assert torch.equal(_draw(t, photo, 1), ref) and torch.equal(_draw(t, photo, 2), ref)


def test_eval_geometry_is_shorter_side_resize_then_centre_crop():
    # 80x40 image: left half black, right half white; shorter side 40 -> resize to floor(40/0.875)
    # = 45 (90x45), centre crop 40: the crop straddles the middle, half dark, half bright.
    img = Image.new("RGB", (80, 40))
    img.paste((255, 255, 255), (40, 0, 80, 40))
    x = build_transform("none", PRE, train=False, normalize=False)(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 40, 40)
    assert x[:, :, :15].max() < 10 and x[:, :, 25:].min() > 245


@pytest.mark.parametrize("preset", PRESETS)
def test_uint8_path_matches_normalized_path(preset, photo):
    raw = _draw(build_transform(preset, PRE, train=True, normalize=False), photo, 5)
    norm = _draw(build_transform(preset, PRE, train=True), photo, 5)
    assert raw.dtype == torch.uint8
    assert torch.allclose(normalizer(PRE)(raw), norm, atol=1e-6)


def test_tutorial_fill_is_nearest_not_black():
    # A flat image stays flat under any rotation/shift/zoom when the fill repeats edge pixels
    # (Keras fill_mode='nearest'); a constant fill would bring in black corners.
    flat = Image.new("RGB", (50, 50), (200, 40, 40))
    t = build_transform("tutorial", PRE, train=True, normalize=False)
    for seed in range(8):
        x = _draw(t, flat, seed).int()
        assert (x - torch.tensor([200, 40, 40]).view(3, 1, 1)).abs().max() <= 1


def test_unknown_preset_is_a_user_error(photo):
    with pytest.raises(TransferlabError, match="--augment 'heavy'"):
        build_transform("heavy", PRE, train=True)


def test_preview_writes_original_plus_n_views_and_is_seeded(tmp_path):
    src = make_image(tmp_path / "p.jpg", (64, 48))
    a = augment_preview(src, "tutorial", 5, tmp_path / "a.png", PRE, seed=3)
    b = augment_preview(src, "tutorial", 5, tmp_path / "b.png", PRE, seed=3)
    grid = Image.open(a)
    assert grid.size == (6 * 40 + 5 * 6, 40 + 16)
    assert a.read_bytes() == b.read_bytes()
    c = augment_preview(src, "tutorial", 5, tmp_path / "c.png", PRE, seed=4)
    assert c.read_bytes() != a.read_bytes()


def test_dataset_names_a_file_that_fails_late(tmp_path):
    good = make_image(tmp_path / "ok.jpg", (40, 40))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:100])  # truncated after the scan
    t = build_transform("none", PRE, train=False)
    ds = ImageDataset([str(good), str(bad)], [0, 1], t)
    x, y = ds[0]
    assert x.shape == (3, 40, 40) and int(y) == 0
    with pytest.raises(ImageError, match="bad.jpg"):
        ds[1]
    deferred = ImageDataset([str(good), str(bad)], [0, 1], t, defer_errors=True)
    batch = collate([deferred[0], deferred[1]])
    assert isinstance(batch, DecodeFailure)
    with pytest.raises(ImageError, match="bad.jpg.*change during the run"):
        raise_if_failed(batch)
