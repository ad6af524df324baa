"""``iter_decoded``: order, failures by index, in-thread == decode threads, clean early stop."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from transferlab.data import loader
from transferlab.data.images import load_image
from transferlab.data.loader import DecodedBatch, iter_decoded
from transferlab.preprocess import Preprocess

PRE = Preprocess((24, 24), "bicubic", 0.875)


@pytest.fixture
def sources(tmp_path: Path) -> list[str]:
    """11 files: 9 good images of varied size/format, one corrupt (index 3), one missing (7)."""
    paths = []
    for i in range(11):
        ext = ".jpg" if i % 2 else ".png"
        paths.append(str(make_image(tmp_path / f"img{i}{ext}", (30 + 5 * i, 40 - i), seed=i)))
    Path(paths[3]).write_bytes(b"not really an image")
    Path(paths[7]).unlink()
    return paths


def _collect(batches: list[DecodedBatch]) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    indices = [i for b in batches for i in b.indices]
    images = np.concatenate([b.images for b in batches])
    failures = [f for b in batches for f in b.failures]
    return indices, images, failures


def test_order_failures_and_equality_with_load_image(sources: list[str]) -> None:
    batches = list(iter_decoded(sources, PRE, batch_size=4, workers=0))
    assert len(batches) == 3  # fixed slices of 4, 4, 3 sources
    for batch in batches:
        assert batch.images.shape == (len(batch.indices), 3, 24, 24)
        assert batch.images.dtype == np.uint8
    indices, images, failures = _collect(batches)
    assert indices == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert [i for i, _ in failures] == [3, 7]
    assert failures[0][1] == "not an image file (cannot identify format)"
    assert failures[1][1] == "file not found"
    for row, index in enumerate(indices):
        assert np.array_equal(images[row], load_image(sources[index], PRE))


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("transferlab-decode")]


def test_decode_threads_give_identical_arrays(sources: list[str]) -> None:
    in_process = _collect(list(iter_decoded(sources, PRE, batch_size=3, workers=0)))
    two = _collect(list(iter_decoded(sources, PRE, batch_size=3, workers=2)))
    assert in_process[0] == two[0] and in_process[2] == two[2]
    assert np.array_equal(in_process[1], two[1])
    assert _decode_threads() == []


def test_early_stop_cancels_queued_batches_and_ends_the_threads(
    sources: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    real = loader._decode_batch

    def counting(job: loader._Job) -> DecodedBatch:
        decoded.append(job[0])
        return real(job)

    monkeypatch.setattr(loader, "_decode_batch", counting)
    batches = iter_decoded(sources * 10, PRE, batch_size=2, workers=2)  # 55 batches
    first = next(batches)
    assert first.indices == [0, 1]
    batches.close()  # what a `break` out of a for loop does
    assert _decode_threads() == []
    assert len(decoded) <= 2 * 2 + 1  # the prefetched ones and the refill, not all 55


def test_an_unexpected_error_reaches_the_consumer_and_ends_the_threads(
    sources: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str, pre: Preprocess, *, max_pixels: int) -> np.ndarray:
        raise MemoryError("out of memory while decoding")  # not an unusable image

    monkeypatch.setattr(loader, "load_image", broken)
    with pytest.raises(MemoryError, match="decoding"):
        list(iter_decoded(sources, PRE, batch_size=2, workers=2))
    assert _decode_threads() == []


def test_empty_input_and_bad_batch_size() -> None:
    assert list(iter_decoded([], PRE, workers=2)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_decoded(["x.jpg"], PRE, batch_size=0))


SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MNV2 = SHARED / "weights" / "mobilenetv2_100.tf_quant_in1k"


@pytest.mark.shared
def test_draft_decoding_keeps_features_within_the_measured_tolerance(tmp_path: Path) -> None:
    """JPEGs at least twice the resize size are DCT-downscaled while decoding (load_image's
    draft). On 32 cats-vs-dogs test photos upscaled 3x and re-encoded (q92), MobileNetV2
    features of drafted vs fully decoded pixels had cosine min 0.988 / median 0.997, mean
    |pixel diff| 2.1 grey levels (max 7.3 on one photo): the bounds below leave a little room."""
    import io

    from PIL import Image

    from transferlab.backbones import create_backbone
    from transferlab.data.images import open_rgb, png_bytes
    from transferlab.runtime import make_runtime

    if not SHARED_MNV2.is_dir():
        pytest.skip("needs ../shared (weights and photos)")
    bb = create_backbone(f"local-dir:{SHARED_MNV2}")
    photos = sorted((SHARED / "datasets" / "cats_vs_dogs_small" / "test").rglob("*.jpg"))[::40]
    drafted, full = [], []
    for photo in photos:
        im = Image.open(photo).convert("RGB")
        buf = io.BytesIO()
        im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=92
        )
        data = buf.getvalue()
        drafted.append(load_image(data, bb.preprocess))
        # the same file decoded at full size: as lossless PNG it cannot be drafted
        full.append(load_image(png_bytes(open_rgb(data)), bb.preprocess))
    assert np.any(np.stack(drafted) != np.stack(full))  # the draft path did engage
    rt = make_runtime(bb, engine="torch")
    a, b = rt(np.stack(drafted)), rt(np.stack(full))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.98 and np.median(cos) >= 0.995
    assert np.abs(np.stack(drafted).astype(int) - np.stack(full)).mean() <= 3.0
