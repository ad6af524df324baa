"""`explain` and `convolve` write real, decodable figures for a trained run."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import transferlab
from test_api import COLOURS, TINY, _photo
from transferlab.cli import app


def test_explain_and_convolve(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, n in (("train", 6), ("val", 3)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                _photo(data / split / cls / f"{cls}.{i}.jpg", colour, rng)
    run = tmp_path / "run"
    transferlab.fit(
        data, out=run, backbone=TINY, pretrained=False, engine="torch", test_fraction=0.0,
        cache_dir=str(tmp_path / "cache"), workers=0,
    )  # fmt: skip
    img = data / "val" / "red" / "red.0.jpg"
    runner = CliRunner()
    r = runner.invoke(app, ["explain", str(run), str(img), "--out", str(tmp_path / "ex")])
    assert r.exit_code == 0, r.output
    names = {p.name for p in (tmp_path / "ex").iterdir()}
    assert {"red.0_gradcam.png", "red.0_feature_maps.png", "red.0_bottleneck.png"} <= names
    assert "filters.png" in names
    for p in (tmp_path / "ex").iterdir():
        with Image.open(p) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    # a folder is explained image by image, like predict takes it; two images with the same
    # name in different folders get their own files (CAM and feature maps alike)
    shots = tmp_path / "shots"
    for cls in ("red", "blue"):
        (shots / cls).mkdir(parents=True)
        (shots / cls / "1.jpg").write_bytes((data / "val" / cls / f"{cls}.0.jpg").read_bytes())
    r = runner.invoke(app, ["explain", str(run), str(shots), "--out", str(tmp_path / "fo")])
    assert r.exit_code == 0, r.output
    names = {p.name for p in (tmp_path / "fo").iterdir()}
    assert {"1_gradcam.png", "1_1_gradcam.png", "1_feature_maps.png", "1_1_feature_maps.png"} <= (
        names
    )
    # Grad-CAM proper on request; the PNG differs from the default (HiResCAM) one.
    r = runner.invoke(
        app, ["explain", str(run), str(img), "--out", str(tmp_path / "gc"), "--method", "gradcam"]
    )
    assert r.exit_code == 0, r.output
    gc, hires = (np.asarray(Image.open(tmp_path / d / "red.0_gradcam.png")) for d in ("gc", "ex"))
    assert gc.shape == hires.shape and (gc != hires).any()
    r = runner.invoke(
        app, ["explain", str(run), str(img), "--out", str(tmp_path / "x"), "--method", "cam++"]
    )
    assert isinstance(r.exception, transferlab.TransferlabError)
    assert "unknown CAM method 'cam++'" in str(r.exception)

    out = tmp_path / "conv.png"
    r = runner.invoke(
        app, ["convolve", str(img), "--kernel", "1,0,-1;2,0,-2;1,0,-1", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        im.load()
    r = runner.invoke(app, ["convolve", str(img), "--kernel", "1,2;3", "--out", str(out)])
    assert isinstance(r.exception, transferlab.TransferlabError)
    assert "rows have different lengths" in str(r.exception)
