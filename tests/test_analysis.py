"""Error analysis: top losses, confusion pairs, suspect labels, TTA, calibration, run comparison.

Pure functions are checked on constructed numbers; TTA/calibration/compare on a tiny random
MobileNetV2 fitted once per module on synthetic, mirror-symmetric images (a few seconds).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import transferlab
from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.evaluation import run_data
from transferlab.evaluation.analysis import (
    load_predictions,
    most_confused,
    out_of_fold_probs,
    save_predictions,
    stratified_sample,
    suspect_labels,
    top_losses,
)
from transferlab.evaluation.compare import compare_runs
from transferlab.evaluation.metrics import fit_temperature
from transferlab.evaluation.run_data import resolve_splits
from transferlab.evaluation.scoring import calibrate, split_logits, tta_probs
from transferlab.model import softmax
from transferlab.storage import read_json

TINY = "mobilenetv2_035"
COLOURS = {"blue": (90, 100, 160), "red": (160, 100, 90)}  # close: the classes overlap a bit


def _mirror_image(path, colour, rng, size=48):
    """Noise around a colour, left half mirrored onto the right: flipping changes no pixel."""
    half = np.clip(np.array(colour) + rng.normal(0, 45, (size, size // 2, 3)), 0, 255)
    arr = np.concatenate([half, half[:, ::-1]], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # PNG: lossless, so the symmetry survives the file


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, n in (("train", 10), ("val", 8), ("test", 6)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                _mirror_image(data / split / cls / f"{cls}{i}.png", colour, rng)
    common = dict(
        backbone=TINY, pretrained=False, engine="torch", cache_dir=str(root / "cache"), workers=0
    )
    clf = transferlab.fit(data, out=root / "run_linear", **common)
    clf_mlp = transferlab.fit(data, out=root / "run_mlp", head="mlp", **common)
    return {"root": root, "data": data, "clf": clf, "clf_mlp": clf_mlp}


# --------------------------------------------------------------------------------------------
# pure functions


def test_top_losses_are_the_most_confidently_wrong_first():
    probs = np.array(
        [
            [0.9, 0.1],  # right
            [0.2, 0.8],  # wrong, p(true)=0.2
            [0.05, 0.95],  # wrong, p(true)=0.05 -> worst
            [0.45, 0.55],  # wrong, p(true)=0.45
            [0.6, 0.4],  # right
        ]
    )
    y = np.zeros(5, dtype=int)
    paths = [f"img{i}.jpg" for i in range(5)]
    rows = top_losses(probs, y, paths, k=2, classes=["cat", "dog"])
    assert [r["index"] for r in rows] == [2, 1]
    assert rows[0]["path"] == "img2.jpg" and rows[0]["label"] == "cat"
    assert rows[0]["predicted"] == "dog" and rows[0]["p_pred"] == pytest.approx(0.95)
    assert rows[0]["loss"] == pytest.approx(-math.log(0.05))
    # k beyond the number of mistakes lists every mistake; only_wrong=False ranks all items
    assert [r["index"] for r in top_losses(probs, y, paths, k=10)] == [2, 1, 3]
    assert [r["index"] for r in top_losses(probs, y, paths, k=10, only_wrong=False)] == [
        2,
        1,
        3,
        4,
        0,
    ]
    assert top_losses(probs, y, paths, k=0) == []
    with pytest.raises(TransferlabError):
        top_losses(probs, y, paths[:3])


def test_most_confused_from_a_known_confusion_matrix():
    cm = [
        [50, 7, 1],  # true a: 7 -> b, 1 -> c
        [2, 40, 7],  # true b: 2 -> a, 7 -> c  (ties with a->b: row-major order)
        [0, 9, 30],  # true c: 9 -> b
    ]
    assert most_confused(cm, ["a", "b", "c"], k=3) == [("c", "b", 9), ("a", "b", 7), ("b", "c", 7)]
    assert most_confused(cm, ["a", "b", "c"], k=10)[-1] == ("a", "c", 1)
    assert len(most_confused(cm, ["a", "b", "c"], k=10)) == 5  # zero cells are not listed
    assert most_confused(np.eye(3, dtype=int) * 5, ["a", "b", "c"]) == []


def test_out_of_fold_head_finds_flipped_labels():
    rng = np.random.default_rng(1)
    n = 40
    x = np.concatenate([rng.normal(-1.5, 1, (n, 16)), rng.normal(1.5, 1, (n, 16))])
    y = np.repeat([0, 1], n)
    flipped = [3, 57]
    y_noisy = y.copy()
    y_noisy[flipped] = 1 - y_noisy[flipped]
    probs = out_of_fold_probs(x, y_noisy, num_classes=2, folds=5, seed=0)
    assert probs.shape == (2 * n, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-9)
    paths = [f"{i}.jpg" for i in range(2 * n)]
    rows = suspect_labels(probs, y_noisy, paths, k=2, classes=["a", "b"], min_confidence=0.8)
    assert sorted(r["index"] for r in rows) == flipped
    assert all(r["label"] != r["predicted"] and r["p_pred"] >= 0.8 for r in rows)


def test_the_only_image_of_a_class_is_left_unjudged_not_fatal():
    """A class with one training image cannot be held out: that image trains in every fold
    and is not judged (NaN), while the others still are and a flipped label is still found."""
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [rng.normal(-2, 1, (20, 8)), rng.normal(2, 1, (20, 8)), rng.normal(0, 1, (1, 8))]
    )
    y = np.repeat([0, 1, 2], [20, 20, 1])
    y[5] = 1  # a flipped label
    probs = out_of_fold_probs(x, y, num_classes=3, folds=5, seed=0)
    assert np.isnan(probs[40]).all() and np.isfinite(probs[:40]).all()
    rows = suspect_labels(probs, y, [f"{i}.jpg" for i in range(41)], k=5, min_confidence=0.6)
    assert [r["index"] for r in rows] == [5]
    assert np.isnan(out_of_fold_probs(x[:2], np.array([0, 1]), num_classes=2)).all()


def test_suspect_labels_respect_the_confidence_floor():
    probs = np.array([[0.3, 0.7], [0.1, 0.9], [0.45, 0.55], [0.8, 0.2]])
    y = np.array([0, 0, 0, 0])
    rows = suspect_labels(probs, y, ["a", "b", "c", "d"], k=5, min_confidence=0.6)
    assert [r["path"] for r in rows] == ["b", "a"]  # c is a coin flip; d agrees with its label


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    y = np.repeat([0, 1, 2], [9000, 900, 3])  # one big class, one small, one tiny
    rows = stratified_sample(y, 1000, seed=0, min_per_class=5)
    assert np.all(np.diff(rows) > 0) and rows.max() < len(y)
    assert np.bincount(y[rows]).tolist() == [909, 91, 3]  # in proportion; all 3 of the tiny
    assert np.array_equal(rows, stratified_sample(y, 1000, seed=0, min_per_class=5))
    assert not np.array_equal(rows, stratified_sample(y, 1000, seed=1, min_per_class=5))
    y2 = np.repeat(np.arange(400), 10)  # many classes: at least min_per_class of each
    assert np.bincount(y2[stratified_sample(y2, 1000, min_per_class=5)]).min() == 5
    assert np.array_equal(stratified_sample(y[:50], 1000), np.arange(50))  # small: everything


def test_predictions_csv_round_trip(tmp_path):
    split = Split(paths=["x/1.jpg", "x/2.jpg"], labels=np.array([0, 1]), digests=["", ""])
    probs = np.array([[0.7, 0.3], [0.6, 0.4]])
    save_predictions(tmp_path, {"test": (split, probs)}, ["cat", "dog"])
    got = load_predictions(tmp_path, "test")
    assert got["paths"] == split.paths and got["labels"] == ["cat", "dog"]
    assert got["predicted"] == ["cat", "cat"]
    np.testing.assert_allclose(got["probs"], probs)
    assert load_predictions(tmp_path, "val") is None


# --------------------------------------------------------------------------------------------
# comparing runs


def _fake_run(path, correct, *, paths=None, acc_ci=(0.5, 0.9)):
    """A run folder with metrics and per-image predictions built from a correctness vector."""
    path.mkdir(parents=True)
    (path / "model.json").write_text(json.dumps({"strategy": "features", "body": {"spec": "x"}}))
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    y = np.arange(n) % 2
    pred = np.where(correct, y, 1 - y)
    probs = np.full((n, 2), 0.2)
    probs[np.arange(n), pred] = 0.8
    acc = float(correct.mean())
    (path / "metrics.json").write_text(
        json.dumps({"test": {"accuracy": acc, "accuracy_ci95": list(acc_ci), "n": n}})
    )
    split = Split(paths=paths or [f"/d/{i}.jpg" for i in range(n)], labels=y, digests=[""] * n)
    save_predictions(path, {"test": (split, probs)}, ["a", "b"])


def test_compare_runs_mcnemar_on_constructed_predictions(tmp_path):
    # 30 images: both right on 15, only A right on 10, only B right on 2, both wrong on 3
    a = [1] * 15 + [1] * 10 + [0] * 2 + [0] * 3
    b = [1] * 15 + [0] * 10 + [1] * 2 + [0] * 3
    _fake_run(tmp_path / "A", a)
    # B lists the same images in another order: pairing must go by path, not by row
    order = list(range(30))[::-1]
    _fake_run(tmp_path / "B", [b[i] for i in order], paths=[f"/d/{i}.jpg" for i in order])
    res = compare_runs([tmp_path / "A", tmp_path / "B"], out=tmp_path / "cmp")
    assert res["shared_test"] is True
    (pair,) = res["mcnemar"]
    assert (pair["only_a_correct"], pair["only_b_correct"]) == (10, 2)
    # exact two-sided binomial: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert pair["method"] == "exact"
    assert pair["p_value"] == pytest.approx(158 / 4096)
    assert [r["test"]["accuracy"] for r in res["runs"]] == [
        pytest.approx(25 / 30),
        pytest.approx(17 / 30),
    ]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["mcnemar"][0]["p_value"] == pytest.approx(158 / 4096)


def test_compare_runs_refuses_mcnemar_on_different_test_sets(tmp_path):
    _fake_run(tmp_path / "A", [1, 0, 1, 1])
    _fake_run(tmp_path / "B", [1, 1, 1, 0], paths=[f"/other/{i}.jpg" for i in range(4)])
    res = compare_runs([tmp_path / "A", tmp_path / "B"])
    assert res["shared_test"] is False and res["mcnemar"] == []
    assert "different images" in res["note"]
    with pytest.raises(TransferlabError, match="not a transferlab run"):
        compare_runs([tmp_path / "A", tmp_path / "nope"])


def test_compare_runs_scores_real_runs_on_one_dataset(fitted):
    root = fitted["root"]
    res = compare_runs([root / "run_linear", root / "run_mlp"], fitted["data"])
    assert res["shared_test"] is True and len(res["mcnemar"]) == 1
    for row, clf in zip(res["runs"], (fitted["clf"], fitted["clf_mlp"]), strict=True):
        # re-scoring on the same test split reproduces the accuracy recorded at fit time
        assert row["test"]["accuracy"] == pytest.approx(clf.metrics["test"]["accuracy"])
    pair = res["mcnemar"][0]
    n = res["runs"][0]["test"]["n"]
    diff = round((res["runs"][0]["test"]["accuracy"] - res["runs"][1]["test"]["accuracy"]) * n)
    assert pair["only_a_correct"] - pair["only_b_correct"] == diff


# --------------------------------------------------------------------------------------------
# TTA and calibration on a real (tiny) model


def _count_runtime_calls(clf):
    ex = clf.extractor()
    real = ex.runtime
    calls: list[np.ndarray] = []

    def counting(images):
        calls.append(np.array(images))
        return real(images)

    ex._runtime = counting
    return calls, lambda: setattr(ex, "_runtime", real)


def test_tta_on_mirror_symmetric_images_equals_plain_and_runs_both_views(fitted):
    clf = fitted["clf"]
    test = resolve_splits(fitted["root"] / "run_linear", ("test",))["test"]
    plain = clf.predict_proba_split(test)  # from the feature cache filled at fit time
    calls, restore = _count_runtime_calls(clf)
    try:
        tta = tta_probs(clf, test, workers=0)
    finally:
        restore()
    # one body call holding both views of every image: the images, then their mirrors
    (views,) = calls
    n = len(test)
    assert views.shape[0] == 2 * n
    np.testing.assert_array_equal(views[n:], views[:n][..., ::-1])
    np.testing.assert_array_equal(views[n:], views[:n])  # symmetric pictures: same pixels
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_tta_views_differ_on_asymmetric_images_and_five_crop_runs_ten(fitted, tmp_path):
    clf = fitted["clf"]
    rng = np.random.default_rng(5)
    paths = []
    for i in range(1):  # left half dark, right half bright: the mirror is another picture
        arr = np.zeros((60, 80, 3), np.uint8)
        arr[:, 40:] = 230
        arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
        p = tmp_path / f"asym{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    plain = tta_probs(clf, paths, flip=False, workers=0)
    flipped = tta_probs(clf, paths, flip=True, workers=0)
    assert np.abs(plain - flipped).max() > 1e-6
    calls, restore = _count_runtime_calls(clf)
    try:
        five = tta_probs(clf, paths, five_crop=True, workers=0)
    finally:
        restore()
    h, w = clf.saved.preprocess.input_size
    (views,) = calls
    assert views.shape == (10, 3, h, w)  # 5 crops x (image, mirror) of the one picture
    assert not np.array_equal(views[0], views[4])  # a corner crop is not the centre crop
    np.testing.assert_array_equal(views[5:], views[:5][..., ::-1])
    np.testing.assert_allclose(five.sum(axis=1), 1, atol=1e-9)


def test_temperature_is_stored_reloaded_and_changes_probs_not_argmax(fitted, tmp_path):
    clf = fitted["clf_mlp"]
    run = fitted["root"] / "run_mlp"
    splits = resolve_splits(run, ("val", "test"))
    before = clf.predict_proba_split(splits["test"])
    res = calibrate(clf, splits["val"], test=splits["test"])
    t = res["temperature"]
    assert t == pytest.approx(
        fit_temperature(split_logits(clf, splits["val"]), splits["val"].labels)
    )
    assert t != pytest.approx(1.0, abs=1e-3)
    # T minimises the val NLL, and T = 1 was a candidate: val log-loss cannot go up
    assert res["val"]["nll_after"] <= res["val"]["nll_before"] + 1e-12
    assert set(res["test"]) >= {"ece_before", "ece_after", "nll_before", "nll_after"}

    copy = tmp_path / "calibrated"
    clf.saved.save(copy)
    assert json.loads((copy / "model.json").read_text())["temperature"] == pytest.approx(t)
    loaded = transferlab.load(copy)
    assert loaded.saved.temperature == pytest.approx(t)
    loaded._extractor = clf.extractor()  # same body and cache; skips rebuilding the runtime
    after = loaded.predict_proba_split(splits["test"])
    assert np.abs(after - before).max() > 1e-4  # the probabilities moved...
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))  # ...the decisions did not
    logits = split_logits(loaded, splits["test"])
    np.testing.assert_allclose(after, softmax(logits, t), atol=1e-5)
    clf.saved.temperature = 1.0  # leave the module fixture as found


def test_resolve_splits_from_data_json_or_a_dataset_folder(fitted, tmp_path):
    run = fitted["root"] / "run_linear"
    from_json = resolve_splits(run, ("train", "val", "test"))
    from_data = resolve_splits(run, ("train", "val", "test"), data=fitted["data"])
    for name in ("train", "val", "test"):
        assert from_json[name].paths == from_data[name].paths
        assert from_json[name].digests == from_data[name].digests
        np.testing.assert_array_equal(from_json[name].labels, from_data[name].labels)
    assert len(from_json["val"]) == 16
    gone = tmp_path / "gone"
    gone.mkdir()
    for f in ("model.json", "data.json"):
        (gone / f).write_bytes((run / f).read_bytes())
    summary = json.loads((gone / "data.json").read_text())
    summary["index"]["root"] = str(tmp_path / "moved")
    (gone / "data.json").write_text(json.dumps(summary))
    with pytest.raises(TransferlabError, match="missing"):
        resolve_splits(gone, ("test",))


def test_classifier_plot_methods(fitted, tmp_path):
    clf = fitted["clf"]
    fig = clf.plot_curves(out=tmp_path / "curves.png")
    assert fig.axes[0].get_xscale() == "log"  # a linear head's history is its L2 grid
    fig = clf.plot_confusion("test")
    counts = [ax for ax in fig.axes if ax.images][0].images[0].get_array()
    np.testing.assert_array_equal(counts, clf.metrics["test"]["confusion_matrix"])
    fig = clf.plot_reliability("val", out=tmp_path / "rel.png")
    assert "ECE" in fig.axes[0].get_legend().get_texts()[1].get_text()
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "rel.png").is_file()
    with pytest.raises(TransferlabError):
        clf.plot_confusion("train")


# --------------------------------------------------------------------------------------------
# evaluation on a dataset given explicitly: scanned as fit scans it


def _with_truncated_jpeg(data, dest):
    """A copy of ``data`` with one truncated JPEG in test/blue: it exists, it does not decode."""
    import shutil

    shutil.copytree(data, dest)
    bad = dest / "test" / "blue" / "broken.jpg"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(bad, quality=90)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return dest, str(bad)


def test_given_data_with_a_corrupt_image_is_skipped_like_fit_skips_it(fitted, tmp_path):
    from transferlab.export import ImageSource

    data, bad = _with_truncated_jpeg(fitted["data"], tmp_path / "data")
    root = fitted["root"]
    res = compare_runs([root / "run_linear", root / "run_mlp"], data)
    assert [s["path"] for s in res["skipped"]] == [bad]
    assert "truncated" in res["skipped"][0]["reason"]
    assert res["shared_test"] is True and len(res["mcnemar"]) == 1
    for row, clf in zip(res["runs"], (fitted["clf"], fitted["clf_mlp"]), strict=True):
        assert [s["path"] for s in row["skipped"]] == [bad]
        # the good images are the run's own test images: the same accuracy as at fit time
        assert row["test"]["n"] == clf.metrics["test"]["n"]
        assert row["test"]["accuracy"] == pytest.approx(clf.metrics["test"]["accuracy"])
    # resolve_splits / classifier_split on given data go through the same scan
    splits = resolve_splits(root / "run_linear", ("test",), data=data)
    assert bad not in splits["test"].paths and all(splits["test"].digests)
    assert bad not in run_data.classifier_split(fitted["clf"], "test", data).paths
    prepared = run_data.prepare_run_data(data, fitted["clf"].saved.config, fitted["clf"].classes)
    assert [p for p, _ in prepared.skipped] == [bad]
    with pytest.raises(TransferlabError, match="differ from the model's"):
        run_data.prepare_run_data(data, fitted["clf"].saved.config, ["red", "blue"])
    # export's image source: the same splits, the corrupt file never offered for calibration
    source = ImageSource(fitted["clf"], root / "run_linear", data)
    assert bad not in [p for p, _ in source.split("test")]
    assert [p for p, _ in source.split("test")] == splits["test"].paths


def test_read_json_policy_missing_is_none_corrupt_names_the_file(fitted, tmp_path):
    assert read_json(tmp_path / "nope.json") is None
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json(good) == {"a": 1}
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(TransferlabError, match=r"bad\.json: unreadable JSON"):
        read_json(bad)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TransferlabError, match=r"binary\.json: unreadable"):
        read_json(tmp_path / "binary.json")
    with pytest.raises(TransferlabError, match="unreadable"):
        read_json(tmp_path)  # a folder, not a file
    # compare_runs follows it: a corrupt metrics.json is an error naming it, not "no metrics"
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted["root"] / "run_linear", run)
    (run / "metrics.json").write_text("{")
    with pytest.raises(TransferlabError, match=r"metrics\.json: unreadable JSON"):
        compare_runs([run])
