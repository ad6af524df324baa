"""rank: k-fold probe, the normal feature cache (a later fit reuses it), output, CLI, real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferlab
from test_api import photo_dataset
from test_backbones import make_local_dir
from transferlab.backbones.identity import short_name
from transferlab.cli import app
from transferlab.errors import TransferlabError
from transferlab.heads import L2_GRID
from transferlab.selection.probe import check_folds, cv_linear_probe, stratified_folds
from transferlab.selection.rank import rank

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def data(tmp_path):
    return photo_dataset(tmp_path / "data", (("train", 8), ("val", 4), ("test", 4)), size=40)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder with two tiny "pretrained" backbones (random weights, 64 px input)."""
    root = tmp_path_factory.mktemp("weights")
    make_local_dir(root / "tiny_a", arch="mobilenetv2_035", seed=0)
    make_local_dir(root / "tiny_b", arch="resnet10t", seed=1)
    return root


def _specs(weights: Path) -> list[str]:
    return [f"local-dir:{weights / 'tiny_a'}", f"local-dir:{weights / 'tiny_b'}"]


def _opts(tmp_path):
    return {"engine": "torch", "workers": 0, "cache_dir": str(tmp_path / "cache")}


def test_stratified_folds_spread_every_class_evenly():
    y = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(y, 3, seed=1)
    for c in range(3):
        counts = np.bincount(folds[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(folds, stratified_folds(y, 3, seed=1))
    assert not np.array_equal(folds, stratified_folds(y, 3, seed=2))


def test_cv_probe_tells_informative_features_from_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    noise = rng.normal(size=(90, 16)).astype(np.float32)
    good = noise.copy()
    good[:, :3] += 3.0 * np.eye(3)[y]
    strong = cv_linear_probe(good, y, num_classes=3, folds=5)
    chance = cv_linear_probe(noise, y, num_classes=3, folds=5)
    assert strong.accuracy > 0.9 and chance.accuracy < 0.6
    for r in (strong, chance):
        assert r.ci95[0] <= r.accuracy <= r.ci95[1] and r.n == 90 and len(r.fold_accuracies) == 5
        assert r.l2 in L2_GRID  # chosen on the grid fit uses, once
    with pytest.raises(TransferlabError, match=r"class #2 has 2 .*at least 3 per class"):
        cv_linear_probe(good[:8], np.array([0, 0, 0, 1, 1, 1, 2, 2]), num_classes=3, folds=3)
    with pytest.raises(TransferlabError, match=r"class 'c' has 4 .*lower --folds to 4"):
        check_folds(np.repeat([0, 1, 2], [5, 5, 4]), 5, 3, ["a", "b", "c"])


def test_rank_scores_candidates_and_fit_reuses_the_cached_features(data, weights, tmp_path):
    out = tmp_path / "rank"
    specs = _specs(weights)
    result = rank(data, backbones=specs, out=out, folds=4, **_opts(tmp_path))
    saved = json.loads((out / "rank.json").read_text())
    assert [c["backbone"] for c in saved["candidates"]] == [c.backbone for c in result.candidates]
    scores = [c["logme"] for c in saved["candidates"]]
    assert scores == sorted(scores, reverse=True)
    dims = {c.backbone: c.feature_dim for c in result.candidates}
    assert dims == {specs[0]: 1280, specs[1]: 512}
    for c in result.candidates:
        assert c.n_rows == 24  # train + val only: the 8 test images are never read
        assert c.cache_hits == 0 and c.images_per_s > 0 and c.params > 0
        assert c.cv_ci95[0] <= c.cv_accuracy <= c.cv_ci95[1]
    assert (out / "rank.png").read_bytes()[:4] == b"\x89PNG"
    clf = transferlab.fit(data, backbone=specs[0], **_opts(tmp_path))
    train, val, test = clf.metrics["extraction"]
    assert train["cache_hits"] == 16 and val["cache_hits"] == 8  # rank's features, reused
    assert test["cache_hits"] == 0 and test["computed"] == 8
    with pytest.raises(TransferlabError, match="holds a rank result already"):
        rank(data, backbones=specs[:1], out=out, **_opts(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TransferlabError, match="holds other files"):
        rank(data, backbones=specs[:1], out=tmp_path / "other", **_opts(tmp_path))


def test_rank_cli_offline_ranks_every_local_backbone(data, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_WEIGHTS", str(weights))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user weights list
    runner = CliRunner()
    common = ["--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--engine", "torch"]
    r = runner.invoke(app, ["rank", str(data), "--out", str(tmp_path / "r"), *common])
    assert r.exit_code != 0 and "--backbones A,B" in str(r.exception)
    r = runner.invoke(
        app, ["rank", str(data), "--offline", "--folds", "3", "--out", str(tmp_path / "r"), *common]
    )
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "r" / "rank.json").read_text())
    assert sorted(short_name(c["backbone"]) for c in saved["candidates"]) == ["tiny_a", "tiny_b"]
    best = saved["candidates"][0]["backbone"]
    assert "LogME" in r.output and f"best: {best}" in r.output and saved["folds"] == 3


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (real data and weights)")
def test_rank_two_real_backbones_on_hymenoptera(tmp_path):
    """Two real ImageNet backbones on ants vs bees (train + val: 348 images): both linear probes
    far above chance; a second rank is served from the feature cache the first one filled."""
    weights = SHARED / "weights"
    specs = [f"local-dir:{weights / n}" for n in
             ("mobilenetv2_100.tf_quant_in1k", "tf_efficientnet_lite0.tf_in1k")]  # fmt: skip
    data = SHARED / "datasets" / "hymenoptera_data"
    result = rank(data, backbones=specs, out=tmp_path / "rank", folds=5)
    assert {c.feature_dim for c in result.candidates} == {1280}
    assert result.candidates[0].logme >= result.candidates[1].logme
    for c in result.candidates:
        assert c.n_rows == 348 and c.cv_accuracy > 0.9 and np.isfinite(c.logme), c
    again = rank(data, backbones=specs[:1], folds=5)
    assert again.best.cache_hits == 348
    assert again.best.logme == pytest.approx(
        next(c.logme for c in result.candidates if c.backbone == again.best.backbone)
    )
