"""Real data, real weights: the issue's accuracy targets on ../shared (marked `shared`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import transferlab

SHARED = Path(__file__).resolve().parents[2] / "shared"
MOBILENETV2 = f"local-dir:{SHARED / 'weights' / 'mobilenetv2_100.tf_quant_in1k'}"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (real data and weights)"),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("feature-cache"))


@pytest.mark.parametrize(
    ("dataset", "split", "target"),
    [
        ("cats_vs_dogs_small", "test", 0.97),
        ("hymenoptera_data", "val", 0.95),
        ("flower_photos_small", "test", 0.88),
    ],
)
def test_linear_head_on_mobilenetv2_meets_target(dataset, split, target, cache_dir, tmp_path):
    data = SHARED / "datasets" / dataset
    kw = {"test_fraction": 0.0} if dataset == "hymenoptera_data" else {}
    clf = transferlab.fit(
        data, backbone=MOBILENETV2, cache_dir=cache_dir, out=tmp_path / "run", **kw
    )
    acc = clf.metrics[split]["accuracy"]
    assert acc >= target, f"{dataset} {split} accuracy {acc:.4f} < {target}"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved[split]["accuracy"] == acc
    if split == "test":
        lo, hi = saved["test"]["accuracy_ci95"]
        assert lo < acc < hi


def test_saved_model_predicts_real_photos_like_the_fitted_one(cache_dir, tmp_path):
    data = SHARED / "datasets" / "cats_vs_dogs_small"
    transferlab.fit(data, backbone=MOBILENETV2, cache_dir=cache_dir, out=tmp_path / "run")
    clf = transferlab.load(tmp_path / "run")
    preds = clf.predict([data / "test" / "cat", data / "test" / "dog"], top_k=2)
    assert len(preds) == 300
    acc = sum(p["label"] in p["path"].split("/")[-1] for p in preds) / len(preds)
    assert acc >= 0.97
