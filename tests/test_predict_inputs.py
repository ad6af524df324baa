"""``Classifier.predict`` / ``predict_proba`` on every input kind, through the one decode path.

input kind                         predict(x) gives           asserted in
path to a file                     ImagePrediction            test_a_file_gives_one_result
folder                             Predictions (list)         test_folder_and_glob_give_lists
glob                               Predictions (list)         test_folder_and_glob_give_lists
PIL image                          ImagePrediction            test_in_memory_kinds_match_the_file
NumPy (H, W, 3) uint8              ImagePrediction            test_in_memory_kinds_match_the_file
NumPy (H, W, 3) float in [0, 1]    ImagePrediction            test_in_memory_kinds_match_the_file
NumPy (H, W) grey / (H, W, 4)      ImagePrediction            test_grey_and_alpha_arrays
torch (C, H, W) float / uint8      ImagePrediction            test_in_memory_kinds_match_the_file
torch (N, C, H, W)                 Predictions of N           test_batches_and_mixed_lists
raw bytes                          ImagePrediction            test_in_memory_kinds_match_the_file
list mixing all of these           Predictions, in order      test_batches_and_mixed_lists
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab
from test_predict import make_dataset, make_run
from transferlab.errors import ImageError, TransferlabError
from transferlab.predict.results import ImagePrediction, Predictions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("inputs") / "data")


@pytest.fixture(scope="module")
def clf(data, tmp_path_factory):
    out = make_run(tmp_path_factory.mktemp("inputs_run") / "run", data)
    return transferlab.load(out)


@pytest.fixture
def photo(data):
    return data / "test" / "red" / "red.0.jpg"


def test_a_file_gives_one_result(clf, photo):
    r = clf.predict(photo, top_k=2)
    assert isinstance(r, ImagePrediction)
    assert r.source == str(photo) and r.label in clf.classes and r.error is None
    assert [lab for lab, _ in r.top_k] == sorted(
        clf.classes, key=lambda c: -r.probs[clf.classes.index(c)]
    )
    assert r.probability == pytest.approx(max(r.probs)) == pytest.approx(r.top_k[0][1])
    # The dict-style access older callers use still works.
    assert r["label"] == r.label and r["path"] == str(photo) and "error" not in r
    proba = clf.predict_proba(photo)
    assert proba.shape == (1, len(clf.classes))
    np.testing.assert_allclose(proba[0], r.probs)
    assert proba.sum() == pytest.approx(1.0, abs=1e-5)


def test_folder_and_glob_give_lists(clf, data):
    folder = clf.predict(data / "test" / "red")
    assert isinstance(folder, Predictions) and len(folder) == 3
    globbed = clf.predict(str(data / "test" / "*" / "*.jpg"))
    assert isinstance(globbed, Predictions) and len(globbed) == 6
    assert {p.source for p in folder} < {p.source for p in globbed}
    assert clf.predict_proba(data / "test").shape == (6, 2)


def test_in_memory_kinds_match_the_file(clf, photo):
    """A file and its decoded array give identical probabilities: one decode path."""
    from_file = clf.predict_proba(photo)[0]
    decoded = np.array(Image.open(photo).convert("RGB"))  # (H, W, 3) uint8
    chw = torch.from_numpy(decoded).permute(2, 0, 1)
    inputs = {
        "bytes": photo.read_bytes(),
        "PIL": Image.open(photo),
        "uint8 HWC": decoded,
        "float HWC": decoded.astype(np.float32) / 255.0,
        "tensor CHW uint8": chw,
        "tensor CHW float": chw.float() / 255.0,
    }
    for kind, x in inputs.items():
        r = clf.predict(x)
        assert isinstance(r, ImagePrediction), kind
        np.testing.assert_array_equal(clf.predict_proba(x)[0], from_file, err_msg=kind)
        np.testing.assert_array_equal(r.probs, from_file, err_msg=kind)


def test_exif_orientation_is_applied_to_pil_images_as_to_files(clf, tmp_path):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    from_file = clf.predict_proba(path)[0]
    np.testing.assert_array_equal(clf.predict_proba(Image.open(path))[0], from_file)
    # ... and the rotation matters: the unrotated pixels give other probabilities.
    raw = np.asarray(Image.open(path).convert("RGB"))
    assert not np.array_equal(clf.predict_proba(raw)[0], from_file)


def test_grey_and_alpha_arrays(clf, photo):
    grey = np.asarray(Image.open(photo).convert("L"))
    grey_png = io.BytesIO()
    Image.fromarray(grey).save(grey_png, format="PNG")
    np.testing.assert_array_equal(
        clf.predict_proba(grey)[0], clf.predict_proba(grey_png.getvalue())[0]
    )
    rgba = np.dstack(
        [np.asarray(Image.open(photo).convert("RGB")), np.full(grey.shape, 255, np.uint8)]
    )
    np.testing.assert_array_equal(clf.predict_proba(rgba)[0], clf.predict_proba(photo)[0])


def test_batches_and_mixed_lists(clf, photo, data):
    decoded = np.asarray(Image.open(photo).convert("RGB"))
    batch = torch.from_numpy(np.stack([decoded, decoded[::-1]])).permute(0, 3, 1, 2)
    out = clf.predict(batch)
    assert isinstance(out, Predictions) and len(out) == 2
    # a batch of 2 and a batch of 1 may take different engine kernels: ~1 ulp apart
    np.testing.assert_allclose(out[0].probs, clf.predict_proba(photo)[0], rtol=0, atol=1e-6)
    mixed = [photo, decoded, data / "test" / "blue", photo.read_bytes(), Image.open(photo)]
    res = clf.predict(mixed)
    assert len(res) == 1 + 1 + 3 + 1 + 1
    assert res[0].source == str(photo) and res[1].source == "<array 1>"
    assert res[-2].source == "<bytes 3>" and res[-1].source == "<image 4>"
    assert all("/blue/" in r.source for r in res[2:5])
    probs = clf.predict_proba(mixed)
    assert probs.shape == (7, 2)
    for r, p in zip(res, probs, strict=True):
        np.testing.assert_array_equal(r.probs, p)


def test_frames(clf, photo, data):
    pd = pytest.importorskip("pandas")
    df = clf.predict([photo, data / "test" / "blue"], top_k=2, as_frame=True)
    assert isinstance(df, pd.DataFrame) and len(df) == 4
    assert list(df.columns) == [
        "source", "label", "probability", "top1", "top1_probability", "top2", "top2_probability"
    ]  # fmt: skip
    assert (df["label"] == df["top1"]).all()
    assert df.equals(clf.predict([photo, data / "test" / "blue"], top_k=2).to_pandas())
    one = clf.predict(photo).to_pandas()
    assert len(one) == 1 and one.loc[0, "source"] == str(photo)


def test_unreadable_inputs(clf, photo, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    res = clf.predict([photo, bad, b"hello"])
    assert res[0].ok and not res[1].ok and not res[2].ok
    assert "error" in res[1] and res[1].label is None and "not an image" in res[2].error
    df = res.to_pandas() if _has_pandas() else None
    if df is not None:
        assert df["error"].notna().tolist() == [False, True, True]
    with pytest.raises(TransferlabError, match="notes.jpg"):
        clf.predict_proba([photo, bad])
    with pytest.raises(ImageError, match=r"float pixels must be in \[0, 1\]"):
        clf.predict(np.full((8, 8, 3), 3.0, np.float32))
    with pytest.raises(ImageError, match="normalised"):
        clf.predict(torch.randn(3, 16, 16))
    with pytest.raises(ImageError, match="cannot read shape"):
        clf.predict(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(TransferlabError, match="cannot read a dict"):
        clf.predict({"a": 1})


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


def test_explanations_are_figures_of_any_input(clf, photo):
    """``transferlab.explain`` & co. decode their picture like predict and return Figures."""
    from matplotlib.figure import Figure

    decoded = np.array(Image.open(photo).convert("RGB"))
    cam = transferlab.explain(clf, decoded, target="blue")
    assert isinstance(cam, Figure) and len(cam.axes) == 2
    assert cam.axes[1].get_title() == "hirescam: evidence for blue"
    top = clf.predict(photo)
    assert cam.axes[0].get_title() == f"predicted {top.label} ({top.probability:.2f})"
    maps = transferlab.feature_maps(clf, photo, channels=4)
    assert len(maps.axes) == 3 * 4  # early, middle, late stage x 4 channels
    first = transferlab.filters(clf)
    assert first.get_suptitle().startswith("first layer: 16 filters of 3x3x3")
    conv = transferlab.convolve(photo.read_bytes(), "1,0,-1;2,0,-2;1,0,-1")
    assert conv.axes[1].get_title() == "kernel 3x3"
    for fig in (cam, maps, first, conv):
        assert fig._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(TransferlabError, match="target='green' is not a class"):
        transferlab.explain(clf, photo, target="green")
    same = clf.explain(decoded, target="blue")  # the method draws the same figure
    assert [ax.get_title() for ax in same.axes] == [ax.get_title() for ax in cam.axes]
