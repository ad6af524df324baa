"""load_image's fast path (simplejpeg decode, torch resize) against the Pillow path it replaces."""

from __future__ import annotations

import io
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from transferlab.data import fast_pixels
from transferlab.data.images import load_image, open_rgb
from transferlab.preprocess import Preprocess


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per fast decode attempt: True where it gave the pixels."""
    calls: list[bool] = []
    real = fast_pixels.decode_jpeg

    def recording(data: bytes):  # noqa: ANN202
        out = real(data)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast_pixels, "decode_jpeg", recording)
    return calls


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_fast_decoder_gives_pillows_pixels(tmp_path: Path, mode: str) -> None:
    path = make_image(tmp_path / "x.jpg", (61, 47), mode=mode, quality=90)
    pixels = fast_pixels.decode_jpeg(path.read_bytes())
    assert pixels is not None and pixels.shape == (47, 61, 3) and pixels.flags.writeable
    assert np.array_equal(pixels, np.asarray(open_rgb(path)))


def test_a_decoder_that_differs_from_pillow_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    shifted = types.SimpleNamespace(
        decode_jpeg=lambda data, colorspace: np.asarray(Image.open(io.BytesIO(data))) // 2
    )
    monkeypatch.setitem(sys.modules, "simplejpeg", shifted)
    assert fast_pixels._decoder.__wrapped__() is None
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # not installed
    assert fast_pixels._decoder.__wrapped__() is None


def test_what_libjpeg_only_warns_about_goes_to_pillow_silently(
    tmp_path: Path, decodes: list[bool], capfd: pytest.CaptureFixture[str]
) -> None:
    """Extraneous bytes before the end marker (seen in real photo sets): libjpeg warns on stderr
    (torchvision's decoder let it print); here Pillow decodes the file as it always did."""
    good = make_image(tmp_path / "good.jpg", (80, 60), quality=90).read_bytes()
    path = tmp_path / "extra.jpg"
    path.write_bytes(good[:-2] + b"\x00" * 40 + good[-2:])
    pre = Preprocess((32, 32), "bilinear", 0.875)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(path, pre)
    assert decodes == [False]
    assert np.array_equal(out, load_image(good, pre))
    assert capfd.readouterr().err == ""


def test_plain_jpegs_take_the_fast_decode_and_match_the_fallback(
    tmp_path: Path, decodes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pre = Preprocess((32, 32), "bilinear", 0.875)
    path = make_image(tmp_path / "x.jpg", (50, 40), quality=90)
    fast = load_image(path, pre)
    assert decodes == [True]
    monkeypatch.setattr(fast_pixels, "decode_jpeg", lambda data: None)  # simplejpeg missing
    assert np.array_equal(load_image(path, pre), fast)


def test_jpegs_that_need_pillow_do_not_take_the_fast_decode(
    tmp_path: Path, decodes: list[bool]
) -> None:
    pre = Preprocess((32, 32), "bilinear", 0.875)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated on display
    load_image(make_image(tmp_path / "rot.jpg", (50, 40), exif=exif.tobytes()), pre)
    load_image(make_image(tmp_path / "cmyk.jpg", (50, 40), mode="CMYK"), pre)
    load_image(make_image(tmp_path / "big.jpg", (400, 300)), pre)  # draft-decoded
    load_image(make_image(tmp_path / "x.png", (50, 40)), pre)
    assert decodes == []


def test_damaged_jpeg_still_gets_pillows_message(tmp_path: Path, decodes: list[bool]) -> None:
    path = make_image(tmp_path / "cut.jpg", (80, 60), quality=95)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(Exception, match="truncated"):
        load_image(path, Preprocess((32, 32), "bilinear", 0.875))
    assert decodes == [False]


@pytest.mark.parametrize("mode", sorted(fast_pixels.MODES))
@pytest.mark.parametrize("size", [(300, 220), (170, 400), (20, 15)], ids=["down", "tall", "up"])
def test_resize_crop_follows_pillows_resize(tmp_path: Path, mode: str, size: tuple) -> None:
    img = open_rgb(make_image(tmp_path / "x.png", size))
    resized, crop = (int(64 * size[0] / min(size)), int(64 * size[1] / min(size))), 56
    left, top = (resized[0] - crop) // 2, (resized[1] - crop) // 2
    pillow = img.resize(resized, getattr(Image.Resampling, mode.upper()))
    pillow = np.asarray(pillow.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)
    ours = fast_pixels.resize_crop(img, resized, (left, top, crop, crop), mode)
    diff = np.abs(ours.astype(int) - pillow)
    assert ours.shape == (3, crop, crop) and ours.dtype == np.uint8
    # Rounding of the intermediate pass differs by 1 on some sizes (mean 0.18 on the tall
    # gradient here; 0.004 on the cats-vs-dogs photos at 224).
    assert diff.max() <= 2 and diff.mean() < 0.25


def test_resize_crop_pads_black_where_the_window_overhangs(tmp_path: Path) -> None:
    img = open_rgb(make_image(tmp_path / "x.png", (40, 40), color=(200, 100, 50)))
    out = fast_pixels.resize_crop(img, (40, 40), (-4, -2, 48, 44), "bilinear")
    assert out.shape == (3, 44, 48)
    assert not out[:, :2].any() and not out[:, :, :4].any() and not out[:, 42:].any()
    assert np.abs(out[:, 2:42, 4:44].astype(int) - np.asarray(img).transpose(2, 0, 1)).max() <= 1


def test_panoramas_resample_only_the_window(tmp_path: Path, decodes: list[bool]) -> None:
    """A 20:1 image would be resized whole to 20x the crop's area: Pillow's window path does it."""
    path = make_image(tmp_path / "pano.jpg", (800, 40), quality=95)
    pre = Preprocess((32, 32), "bicubic", 1.0)
    out = load_image(path, pre)
    full = open_rgb(path).resize((640, 32), Image.Resampling.BICUBIC).crop((304, 0, 336, 32))
    assert decodes == [True]  # decoded fast, resampled by Pillow
    assert np.abs(out.astype(int) - np.asarray(full).transpose(2, 0, 1)).mean() < 0.01
