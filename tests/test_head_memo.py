"""A re-fit on unchanged features takes the head from the cache (``heads.remember``): the same
bytes, probabilities and history as fitting it, and a fresh fit whenever anything it depends on
changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_api import _fit, _photo, photo_dataset
from transferlab.cache_admin import cache_info
from transferlab.heads.remember import HEADS_DIR, features_digest


@pytest.fixture
def data(tmp_path):
    return photo_dataset(tmp_path / "data", (("train", 10), ("val", 5), ("test", 5)))


def _run(data, tmp_path, name, **kw):
    out = tmp_path / name
    clf = _fit(data, tmp_path, out=out, **kw)
    return clf, out


def test_a_refit_on_unchanged_features_recalls_the_same_head(data, tmp_path):
    first, out1 = _run(data, tmp_path, "a")
    again, out2 = _run(data, tmp_path, "b")
    assert first.metrics["timings"]["head_fit_s"] > 0
    assert "head_recalled_s" not in first.metrics["timings"]
    assert again.metrics["timings"]["head_fit_s"] == 0.0
    assert "head_recalled_s" in again.metrics["timings"]
    assert (out1 / "head.safetensors").read_bytes() == (out2 / "head.safetensors").read_bytes()
    assert json.loads((out1 / "history.json").read_text()) == json.loads(
        (out2 / "history.json").read_text()
    )
    for split in ("val", "test"):
        assert again.metrics[split]["log_loss"] == first.metrics[split]["log_loss"]
    # every image is reported once, as a cache hit
    ext = again.metrics["extraction"]
    assert [e["images"] for e in ext] == [20, 10, 10]
    assert sum(e["cache_hits"] for e in ext) == 40 and sum(e["computed"] for e in ext) == 0
    assert cache_info(tmp_path / "cache").others[HEADS_DIR]["files"] == 2


def test_what_the_head_depends_on_changing_means_a_fresh_fit(data, tmp_path):
    _run(data, tmp_path, "a")
    for name, kw in (("seed", {"seed": 7}), ("mlp", {"head": "mlp"})):
        clf, _ = _run(data, tmp_path, name, **kw)
        assert clf.metrics["timings"]["head_fit_s"] > 0, name
    # a changed training image: new features, so a new head
    _photo(data / "train" / "red" / "red.0.jpg", (200, 200, 40), np.random.default_rng(5))
    clf, _ = _run(data, tmp_path, "changed")
    assert clf.metrics["timings"]["head_fit_s"] > 0


def test_a_damaged_kept_head_is_fitted_again(data, tmp_path):
    _, out1 = _run(data, tmp_path, "a")
    (weights,) = (tmp_path / "cache" / HEADS_DIR).glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    clf, out2 = _run(data, tmp_path, "b")
    assert clf.metrics["timings"]["head_fit_s"] > 0
    assert (out1 / "head.safetensors").read_bytes() == (out2 / "head.safetensors").read_bytes()


def test_a_test_image_added_since_is_computed_with_the_recalled_head(data, tmp_path):
    first, _ = _run(data, tmp_path, "a")
    _photo(data / "test" / "blue" / "blue.new.jpg", (40, 60, 220), np.random.default_rng(9))
    clf, _ = _run(data, tmp_path, "b")
    assert clf.metrics["timings"]["head_fit_s"] == 0.0  # train and val did not change
    assert clf.metrics["test"]["n"] == first.metrics["test"]["n"] + 1
    assert sum(e["computed"] for e in clf.metrics["extraction"]) == 1


def test_the_features_digest_does_not_depend_on_the_chunking():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    whole = features_digest([x])
    assert features_digest([x[:13], x[13:40], x[40:]]) == whole
    assert features_digest([x.astype(np.float64)]) == whole  # float32 bytes are what count
    y = x.copy()
    y[17, 3] = np.nextafter(y[17, 3], np.float32(np.inf))
    assert features_digest([y]) != whole
