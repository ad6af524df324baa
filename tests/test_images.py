"""Safe decoding (every broken input → a clear ImageError), mode conversion, timm geometry."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from transferlab.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    bytes_digest,
    file_digest,
    load_image,
    open_rgb,
)
from transferlab.errors import ImageError, TransferlabError
from transferlab.preprocess import Preprocess


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width``×``height`` but holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _reason(source, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        open_rgb(source, **kwargs)
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# broken inputs


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        open_rgb(path)
    assert info.value.reason == "empty file (0 bytes)"
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_text_renamed_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("just some text, not a picture\n")
    assert _reason(path) == "not an image file (cannot identify format)"


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "file not found"


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = make_image(tmp_path / "cut.jpg", (64, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path).startswith("truncated or corrupt image data: ")


def test_corrupt_png_data(tmp_path: Path) -> None:
    path = make_image(tmp_path / "bad.png", (64, 64))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = b"\xab" * 40
    path.write_bytes(bytes(data))
    assert _reason(path).startswith("truncated or corrupt image data: ")


def test_corrupt_png_header_is_not_called_a_non_image(tmp_path: Path) -> None:
    data = bytearray(make_image(tmp_path / "x.png", (16, 16)).read_bytes())
    data[29] ^= 0xFF  # the IHDR checksum
    assert _reason(bytes(data)) == "truncated or corrupt image data: damaged PNG header"


def test_decompression_bomb_checked_from_header() -> None:
    # The file is a few dozen bytes: decoding it would fail as corrupt, so this reason proves the
    # size was checked from the header first.
    reason = _reason(_png_header(100_000, 100_000))
    assert reason == (
        f"image is 100000×100000 = 10000000000 pixels, over the limit of {MAX_PIXELS}; "
        "raise --max-pixels if you trust it"
    )


def test_pixel_limit_is_an_argument(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png", (64, 64))
    assert "4096 pixels, over the limit of 4095" in _reason(path, max_pixels=4095)
    assert open_rgb(path, max_pixels=4096).size == (64, 64)


def test_raised_limit_beats_pillows_own_ceiling() -> None:
    saved = Image.MAX_IMAGE_PIXELS
    # 200 M pixels is over Pillow's hard 2 × MAX_IMAGE_PIXELS; the user's limit decides instead
    # (here the image is then simply found to hold no data).
    reason = _reason(_png_header(20_000, 10_000), max_pixels=300_000_000)
    assert reason.startswith("truncated or corrupt image data")
    assert saved == Image.MAX_IMAGE_PIXELS


def test_upload_bytes_are_named_upload() -> None:
    with pytest.raises(ImageError) as info:
        open_rgb(b"GIF? no")
    assert info.value.path == "<upload>"


# ---------------------------------------------------------------------------------------------
# conversions


def test_bytes_and_path_decode_alike(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png", (30, 20))
    from_path = open_rgb(path)
    assert from_path.mode == "RGB" and from_path.size == (30, 20)
    assert np.array_equal(np.asarray(from_path), np.asarray(open_rgb(path.read_bytes())))


def test_grayscale(tmp_path: Path) -> None:
    img = open_rgb(make_image(tmp_path / "g.png", mode="L"))
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_one_bit(tmp_path: Path) -> None:
    img = open_rgb(make_image(tmp_path / "b.png", mode="1"))
    assert img.mode == "RGB" and set(np.unique(np.asarray(img))) <= {0, 255}


def test_palette_with_transparency_goes_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putdata([0, 1, 1, 0])
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # palette index 0 (black) is transparent
    arr = np.asarray(open_rgb(path))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [255, 0, 0]


def test_rgba_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = (0, 0, 200)
    rgba[0, :, 3] = (0, 255, 128)
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    arr = np.asarray(open_rgb(path)).astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]  # fully transparent → white
    assert arr[0, 1].tolist() == [0, 0, 200]  # opaque → its colour
    assert abs(arr[0, 2, 0] - 127) <= 1 and abs(arr[0, 2, 2] - 227) <= 1  # half → blend


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = make_image(tmp_path / "c.jpg", (32, 32), mode="CMYK", color=(200, 40, 40), quality=95)
    img = open_rgb(path)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert img.mode == "RGB"
    assert abs(r - 200) < 15 and abs(g - 40) < 15 and abs(b - 40) < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    arr = np.asarray(open_rgb(path))
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_float_tiff(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    assert np.asarray(open_rgb(path))[0, :, 1].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = make_image(tmp_path / "rot.jpg", (40, 20), exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert open_rgb(path).size == (20, 40)


def test_unicode_file_name(tmp_path: Path) -> None:
    path = make_image(tmp_path / "ĉhat_猫 ü.png", (12, 10))
    assert open_rgb(path).size == (12, 10)
    assert load_image(path, Preprocess((8, 8), crop_pct=1.0)).shape == (3, 8, 8)


def test_draft_decodes_jpeg_smaller_but_not_below_request(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.jpg", (800, 600))
    assert open_rgb(path, draft=(200, 150)).size == (200, 150)  # 1/4 scale fits exactly
    assert open_rgb(path, draft=(201, 150)).size == (400, 300)  # 1/4 would be too small
    assert open_rgb(path).size == (800, 600)


# ---------------------------------------------------------------------------------------------
# timm geometry


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess((224, 224), "bilinear", 0.875),
        Preprocess((224, 224), "bicubic", 0.95),
        Preprocess((160, 128), "bicubic", 0.9),  # non-square: timm's ResizeKeepRatio
        Preprocess((96, 96), "nearest", 1.0),
        Preprocess((112, 112), "lanczos", 0.875, "squash"),
        Preprocess((64, 64), "bilinear", 1.25),  # resize smaller than crop: black padding
    ],
    ids=lambda p: p.key().split("-m")[0],
)
def test_load_image_matches_timm_eval_transform(tmp_path: Path, pre: Preprocess) -> None:
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(
        input_size=(3, *pre.input_size),
        interpolation=pre.interpolation,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        is_training=False,
        normalize=False,  # uint8 CHW tensor, directly comparable
    )
    for size in [(300, 220), (190, 330)]:  # landscape and portrait
        path = make_image(tmp_path / f"photo_{size[0]}.png", size)  # lossless: no draft
        ours = load_image(path, pre)
        theirs = np.asarray(transform(Image.open(path).convert("RGB")))
        assert ours.shape == theirs.shape == (3, *pre.input_size)
        assert ours.dtype == np.uint8 and ours.flags.c_contiguous
        assert np.abs(ours.astype(int) - theirs).mean() <= 1.0


def test_load_image_draft_stays_close_on_big_jpeg(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.jpg", (1200, 900), quality=95)
    pre = Preprocess((224, 224), "bicubic", 0.875)
    full = np.asarray(open_rgb(path).resize((341, 256), Image.Resampling.BICUBIC))
    full = full[16:240, 58:282].transpose(2, 0, 1).astype(int)
    assert np.abs(load_image(path, pre).astype(int) - full).mean() < 2.0


def test_load_image_rejects_border_and_unknown_interpolation(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png")
    with pytest.raises(TransferlabError, match="unsupported"):
        load_image(path, Preprocess((16, 16), crop_mode="border"))
    with pytest.raises(TransferlabError, match="interpolation 'random'"):
        load_image(path, Preprocess((16, 16), interpolation="random"))


def test_load_image_reports_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(path, Preprocess((16, 16)))


# ---------------------------------------------------------------------------------------------
# identity


def test_digests(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png")
    data = path.read_bytes()
    assert file_digest(path) == hashlib.sha256(data).hexdigest() == bytes_digest(data)


def test_image_extensions() -> None:
    wanted = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    assert wanted <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_every_extension_round_trips(tmp_path: Path) -> None:
    for ext in sorted(IMAGE_EXTENSIONS):
        mode = "L" if ext == ".pgm" else "RGB"
        path = make_image(tmp_path / f"x{ext}", (20, 10), mode=mode)
        assert open_rgb(path.read_bytes()).size == (20, 10), ext
