"""End-to-end behaviour of the Python API on synthetic images and a tiny random backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import transferlab
from transferlab.errors import TransferlabError

TINY = "mobilenetv2_035"  # random init: no network, ~0.4 M parameters


def _photo(path, colour, rng, size=48):
    """A noisy image dominated by one colour: separable by any reasonable features."""
    base = np.array(colour, dtype=np.float32)
    img = base + rng.normal(0, 25, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)


COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}


@pytest.fixture
def split_data(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                _photo(root / split / cls / f"{cls}.{i}.jpg", colour, rng)
    return root


def _fit(data, tmp_path, **kw):
    kw.setdefault("backbone", TINY)
    kw.setdefault("pretrained", False)
    kw.setdefault("engine", "torch")
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("workers", 0)
    return transferlab.fit(data, **kw)


def test_fit_features_evaluates_saves_and_loads(split_data, tmp_path):
    out = tmp_path / "run"
    clf = _fit(split_data, tmp_path, out=out)
    assert clf.classes == ["blue", "red"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 0.9
    assert metrics["test"]["accuracy"] >= 0.9
    lo, hi = metrics["test"]["accuracy_ci95"]
    assert lo <= metrics["test"]["accuracy"] <= hi
    # Everything in the run folder is JSON or safetensors: nothing to unpickle.
    names = {p.name for p in out.iterdir()}
    assert {"model.json", "body.safetensors", "head.safetensors", "metrics.json"} <= names
    assert all(
        p.suffix in (".json", ".safetensors", ".csv", ".png", ".html") for p in out.iterdir()
    )

    loaded = transferlab.load(out)
    assert loaded.classes == clf.classes
    preds = loaded.predict([split_data / "test" / "red", split_data / "test" / "blue"], top_k=2)
    assert len(preds) == 12
    correct = [p["label"] == ("red" if "/red/" in p["path"] else "blue") for p in preds]
    assert np.mean(correct) >= 0.9
    assert all(abs(sum(prob for _, prob in p["top_k"]) - 1) < 1e-5 for p in preds)
    # The loaded model reproduces the fitted one's test metrics exactly.
    again = loaded.evaluate(split_data, split="test")
    assert again["accuracy"] == metrics["test"]["accuracy"]


def test_refit_hits_the_feature_cache(split_data, tmp_path):
    first = _fit(split_data, tmp_path)
    second = _fit(split_data, tmp_path, head="mlp")
    assert sum(e["computed"] for e in first.metrics["extraction"]) == 48
    assert sum(e["cache_hits"] for e in second.metrics["extraction"]) == 48
    assert sum(e["computed"] for e in second.metrics["extraction"]) == 0


def test_same_seed_same_numbers(split_data, tmp_path):
    a = _fit(split_data, tmp_path, head="mlp", seed=3)
    b = _fit(split_data, tmp_path, head="mlp", seed=3)
    assert a.metrics["test"] == b.metrics["test"]
    for (ka, va), (kb, vb) in zip(
        a.net.head.state_dict().items(), b.net.head.state_dict().items(), strict=True
    ):
        assert ka == kb and (va == vb).all()


def test_broken_images_are_skipped_with_a_report_or_fail_with_strict(split_data, tmp_path):
    (split_data / "train" / "red" / "empty.jpg").write_bytes(b"")
    (split_data / "train" / "blue" / "notes.jpg").write_text("not a picture")
    good = (split_data / "train" / "red" / "red.0.jpg").read_bytes()
    (split_data / "val" / "red" / "cut.jpg").write_bytes(good[: len(good) // 2])
    clf = _fit(split_data, tmp_path)
    skipped = {s["path"].rsplit("/", 1)[-1] for s in clf.data_summary["skipped"]}
    assert skipped == {"empty.jpg", "notes.jpg", "cut.jpg"}
    assert clf.data_summary["counts"]["train"] == {"blue": 12, "red": 12}
    with pytest.raises(TransferlabError, match="unusable image"):
        _fit(split_data, tmp_path, strict=True)


def test_leakage_across_splits_is_reported(split_data, tmp_path):
    src = split_data / "train" / "red" / "red.0.jpg"
    (split_data / "test" / "red" / "copy.jpg").write_bytes(src.read_bytes())
    clf = _fit(split_data, tmp_path)
    pairs = clf.data_summary["cross_split_duplicates"]
    assert len(pairs) == 1 and {p.rsplit("/", 1)[-1] for p in pairs[0]} == {"red.0.jpg", "copy.jpg"}


def test_class_folders_get_a_recorded_stratified_split(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    for cls, colour in COLOURS.items():
        for i in range(20):
            _photo(root / cls / f"{i}.jpg", colour, rng)
    clf = _fit(root, tmp_path)
    counts = clf.data_summary["counts"]
    assert counts["train"] == {"blue": 12, "red": 12}
    assert counts["val"] == {"blue": 4, "red": 4} and counts["test"] == {"blue": 4, "red": 4}


def test_unknown_strategy_and_head_are_user_errors(split_data, tmp_path):
    with pytest.raises(TransferlabError, match="--strategy"):
        _fit(split_data, tmp_path, strategy="magic")
    with pytest.raises(TransferlabError, match="--head"):
        _fit(split_data, tmp_path, head="forest")


def test_load_rejects_a_truncated_weights_file(split_data, tmp_path):
    out = tmp_path / "run"
    _fit(split_data, tmp_path, out=out)
    body = out / "body.safetensors"
    body.write_bytes(body.read_bytes()[:1000])
    with pytest.raises(TransferlabError, match="corrupt or truncated"):
        transferlab.load(out)
