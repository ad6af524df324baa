"""The prediction engine: lazy walk, chunking, incremental output, resume, threshold, errors."""

from __future__ import annotations

import csv
import inspect
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import transferlab
from test_api import COLOURS, TINY, _photo, photo_dataset
from transferlab.errors import ImageError, TransferlabError
from transferlab.predict import UNKNOWN, PredictionEngine, iter_sources, read_done


def make_dataset(root, counts=(("train", 6), ("val", 3), ("test", 3)), seed=0):
    """``root/{train,val,test}/{blue,red}/*.jpg``: noisy images dominated by one colour."""
    return photo_dataset(root, counts, seed=seed)


def make_run(out, data, *, size=64, cache_dir=None):
    """A small but sensible run folder, built in about a second instead of a full ``fit``.

    Random MobileNetV2-0.35 body at ``size``² input; linear head = nearest class centroid of the
    standardized training features (so red/blue are told apart with moderate confidence);
    metrics and the dataset index recorded like ``fit`` does. Saved and reloaded through the
    real run-folder format.
    """
    import timm
    import torch

    from transferlab.api import Classifier
    from transferlab.backbones import timm_body_recipe
    from transferlab.config import FitConfig
    from transferlab.data.discover import discover
    from transferlab.data.images import load_image
    from transferlab.evaluation.metrics import classification_report
    from transferlab.heads import build_head
    from transferlab.model import ClassifierNet
    from transferlab.preprocess import Preprocess
    from transferlab.runs import SavedModel
    from transferlab.storage import state_digest

    torch.manual_seed(0)
    body = timm.create_model(TINY, pretrained=False, num_classes=0).eval()
    pre = Preprocess(input_size=(size, size))
    index = discover(data)
    classes = list(index.classes)

    def features(split):
        rows = [s for s in index.samples if s.split == split]
        x = torch.from_numpy(np.stack([load_image(s.path, pre) for s in rows])).float() / 255
        m = torch.tensor(pre.mean).view(1, 3, 1, 1)
        sd = torch.tensor(pre.std).view(1, 3, 1, 1)
        with torch.no_grad():
            f = body((x - m) / sd)
        return f, np.array([classes.index(s.label) for s in rows])

    f, y = features("train")
    spec = {"kind": "linear", "in_features": int(f.shape[1]), "num_classes": len(classes)}
    head = build_head(spec)
    mean, std = f.mean(0), f.std(0) + 1e-3
    z = (f - mean) / std
    centroids = torch.stack([z[torch.from_numpy(y == k)].mean(0) for k in range(len(classes))])
    scale = 4.0 / z.shape[1]  # moderate logits: probabilities well inside (0, 1)
    with torch.no_grad():
        head.standardize.mean.copy_(mean)
        head.standardize.std.copy_(std)
        head.net.weight.copy_(centroids * scale)
        head.net.bias.copy_(-0.5 * (centroids**2).sum(1) * scale)
    cfg = FitConfig(
        backbone=TINY, pretrained=False, workers=0, cache_dir=str(cache_dir or out.parent / "cache")
    )
    saved = SavedModel(
        net=ClassifierNet(body, head).eval(),
        classes=classes,
        preprocess=pre,
        body={
            "spec": TINY,
            "weights_hash": state_digest(body),
            "recipe": timm_body_recipe(TINY, body),
            "trained": False,
        },
        head=spec,
        strategy="features",
        config=cfg.to_dict(),
    )
    clf = Classifier(saved)
    for split in ("val", "test"):
        fs, ys = features(split)
        with torch.no_grad():
            probs = torch.softmax(head(fs), 1).numpy()
        clf.metrics[split] = classification_report(ys, probs, classes)
    clf.data_summary = {"index": index.to_dict()}
    clf.save(out)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    return make_run(tmp / "run", make_dataset(tmp / "data"))


@pytest.fixture(scope="module")
def clf(run_dir):
    return transferlab.load(run_dir)


@pytest.fixture
def photos(tmp_path):
    """12 images in nested folders plus two unreadable files."""
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for i in range(12):
        cls = "red" if i % 2 else "blue"
        _photo(root / f"d{i % 3}" / "sub" / f"{cls}{i}.jpg", COLOURS[cls], rng)
    (root / "d0" / "notes.jpg").write_text("not a picture")
    (root / "d1" / "empty.png").write_bytes(b"")
    (root / "d1" / "readme.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()
    _photo(root / ".hidden" / "x.jpg", COLOURS["red"], rng)  # hidden: skipped
    return root


def _engine(clf, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return PredictionEngine(clf, **kw)


# -- sources ----------------------------------------------------------------------------------


def test_walk_is_lazy_and_finds_images_only(photos, monkeypatch):
    import transferlab.predict.sources as sources_mod

    gen = iter_sources(photos)
    assert inspect.isgenerator(gen)
    opened = []
    real_scandir = os.scandir

    def counting_scandir(path):
        opened.append(path)
        return real_scandir(path)

    monkeypatch.setattr(sources_mod.os, "scandir", counting_scandir)
    first = next(iter_sources(photos))
    assert first.endswith((".jpg", ".png"))
    # The first file came before the whole tree (root, 3 folders, 3 sub-folders) was listed.
    assert len(opened) < 7
    monkeypatch.undo()
    found = sorted(os.path.relpath(p, photos) for p in iter_sources(photos))
    assert len(found) == 14  # 12 photos + 2 unreadable ones with image extensions
    assert not any(".hidden" in p or p.endswith(".txt") for p in found)


def test_sources_are_checked_up_front_and_globs_expand(photos):
    with pytest.raises(TransferlabError, match="no such file"):
        iter_sources([photos, photos / "typo"])  # fails before yielding anything
    matched = list(iter_sources(str(photos / "**" / "red*.jpg")))
    assert len(matched) == 6 and all("red" in os.path.basename(p) for p in matched)
    single = photos / "d1" / "sub" / "red1.jpg"
    assert list(iter_sources(single)) == [str(single)]


def test_paths_are_decoded_in_bounded_chunks(clf, photos, monkeypatch):
    import transferlab.data.loader as loader

    seen = []
    real = loader.iter_decoded

    def spy(sources, *a, **kw):
        seen.append(len(sources))
        return real(sources, *a, **kw)

    monkeypatch.setattr(loader, "iter_decoded", spy)
    engine = _engine(clf, batch_size=2, chunk_size=4)
    preds = list(engine.iter_predict(photos))
    assert len(preds) == 14
    assert seen == [4, 4, 4, 2]  # never more than chunk_size paths held at once


# -- results ----------------------------------------------------------------------------------


def test_unreadable_files_are_reported_not_fatal(clf, photos):
    preds = {os.path.basename(p.path): p for p in _engine(clf).iter_predict(photos)}
    assert preds["notes.jpg"].probs is None and "not an image" in preds["notes.jpg"].error
    assert preds["empty.png"].probs is None and "empty" in preds["empty.png"].error
    good = [p for p in preds.values() if p.probs is not None]
    assert len(good) == 12
    assert all(abs(float(p.probs.sum()) - 1) < 1e-5 for p in good)


def test_threshold_labels_low_confidence_unknown(clf, photos):
    preds = [p for p in _engine(clf).iter_predict(photos) if p.probs is not None]
    tops = sorted(float(p.probs.max()) for p in preds)
    cut = (tops[0] + tops[-1]) / 2 if tops[0] < tops[-1] else 1.0
    engine = _engine(clf, threshold=cut)
    rows = [engine.row(p, top_k=2) for p in preds]
    assert any(r["label"] == UNKNOWN for r in rows)
    for r in rows:
        assert (r["label"] == UNKNOWN) == (r["probability"] < cut)
        assert r["top_k"][0][0] in clf.classes  # the ranking still names the real classes
    assert all(r["label"] != UNKNOWN for r in (_engine(clf).row(p) for p in preds))
    with pytest.raises(TransferlabError, match="threshold"):
        PredictionEngine(clf, threshold=1.5)


def test_api_predict_goes_through_the_engine(clf, photos):
    rows = clf.predict(photos, top_k=2)
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert "error" in by_name["notes.jpg"]
    engine_probs = {p.path: p.probs for p in _engine(clf).iter_predict(photos) if p.error is None}
    for r in rows:
        if "error" not in r:
            (lab, p), _ = r["top_k"]
            assert p == pytest.approx(float(engine_probs[r["path"]].max()), abs=1e-5)
            assert lab == r["label"]


def test_a_ranking_of_fewer_than_one_label_is_refused_not_read_as_one(clf, photos, tmp_path):
    rows = [r for r in clf.predict(photos, top_k=99) if "error" not in r]
    assert rows and all(len(r["top_k"]) == len(clf.classes) for r in rows)  # at most C
    for bad in (0, -1, 1.5, True):
        with pytest.raises(TransferlabError, match="whole number >= 1"):
            clf.predict(photos, top_k=bad)
    with pytest.raises(TransferlabError, match="whole number >= 1"):
        _engine(clf).run(photos, tmp_path / "out.csv", top_k=0)
    assert not (tmp_path / "out.csv").exists()


def test_a_format_that_contradicts_the_file_name_is_refused(clf, photos, tmp_path):
    with pytest.raises(TransferlabError, match="name says json but the format asked for is csv"):
        _engine(clf).run(photos, tmp_path / "x.json", fmt="csv")
    assert not (tmp_path / "x.json").exists()
    _engine(clf).run(photos, tmp_path / "y.json", fmt="json")
    assert json.loads((tmp_path / "y.json").read_text())


def test_predict_images_accepts_bytes_pil_and_arrays(clf, photos):
    engine = _engine(clf)
    path = photos / "d1" / "sub" / "red1.jpg"
    (from_file,) = [p.probs for p in engine.iter_predict(path)]
    data = path.read_bytes()
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    hwc = np.asarray(pil)
    chw = engine.decode(data)  # already preprocessed: (3, H, W) at the input size
    probs = engine.predict_images([data, pil, hwc, chw])
    assert probs.shape == (4, len(clf.classes))
    np.testing.assert_allclose(probs[0], from_file, atol=1e-5)
    np.testing.assert_allclose(probs[3], from_file, atol=1e-5)
    # PIL/arrays are the decoded JPEG re-encoded losslessly: same pixels, same answer.
    np.testing.assert_allclose(probs[1], probs[2], atol=1e-6)
    assert int(probs[1].argmax()) == int(from_file.argmax())
    with pytest.raises(ImageError, match="not an image"):
        engine.predict_images([b"hello"])
    with pytest.raises(ImageError, match="uint8"):
        engine.predict_images([hwc.astype(np.float32)])


# -- output files and resume ------------------------------------------------------------------


def _rows(path):
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_interrupted_run_resumes_each_path_exactly_once(clf, photos, tmp_path, suffix):
    out = tmp_path / f"results{suffix}"
    engine = _engine(clf, batch_size=2, chunk_size=4)
    batches = 0

    def stop_after_two(n):
        nonlocal batches
        batches += 1
        if batches == 2:
            raise _Interrupt

    errors = []
    with pytest.raises(_Interrupt):
        engine.run(photos, out, on_batch=stop_after_two, on_error=lambda p, r: errors.append(p))
    partial = _rows(out)
    assert 0 < len(partial) < 14  # flushed per batch: what finished is on disk
    # A kill mid-write leaves a torn last line; resume must cut it and redo that path.
    with out.open("a") as fh:
        fh.write(str(photos / "d2" / "sub" / "blue2.jpg") + ",bl" if suffix == ".csv" else '{"pa')

    with pytest.raises(TransferlabError, match="--resume"):
        engine.run(photos, out)  # refuses to clobber without --resume/--overwrite
    summary = engine.run(photos, out, resume=True, on_error=lambda p, r: errors.append(p))
    assert summary.resumed == len({r["path"] for r in partial})
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))  # nothing twice
    expected = set(iter_sources(photos))
    if suffix == ".csv":
        # CSV holds results only; the unreadable files went to on_error (once per attempt).
        assert set(paths) == expected - {p for p in expected if p.endswith(("notes.jpg", ".png"))}
        assert {os.path.basename(p) for p in errors} == {"notes.jpg", "empty.png"}
        assert rows[0].keys() >= {"path", "label", "probability", "label1", "prob1"}
    else:
        assert set(paths) == expected
        assert sum("error" in r for r in rows) == 2
    assert read_done(out, suffix.lstrip(".")) == set(paths)


def test_overwrite_and_json_array_output(clf, photos, tmp_path):
    engine = _engine(clf)
    out = tmp_path / "all.json"
    engine.run(photos, out, top_k=2)
    engine.run(photos, out, top_k=2, overwrite=True)
    rows = json.loads(out.read_text())
    assert len(rows) == 14 and sum("error" in r for r in rows) == 2
    ok = [r for r in rows if "error" not in r]
    assert all(len(r["top_k"]) == 2 for r in ok)
    with pytest.raises(TransferlabError, match="resume"):
        engine.run(photos, out, resume=True)
    with pytest.raises(TransferlabError, match="columns"):
        csv_out = tmp_path / "r.csv"
        engine.run(photos, csv_out, top_k=1)
        engine.run(photos, csv_out, top_k=2, resume=True)


def test_cli_predict_writes_resumable_output(run_dir, photos, tmp_path):
    import typer
    from typer.testing import CliRunner

    from transferlab.cli_ship import register

    app = typer.Typer()

    @app.command()
    def predict() -> None:  # the old command: register() must replace it
        raise AssertionError("old predict called")

    register(app)
    out = tmp_path / "cli.jsonl"
    args = ["predict", str(run_dir), str(photos), "-o", str(out), "--workers", "0"]
    r = CliRunner().invoke(app, [*args, "--threshold", "0.5"])
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 14
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 14  # everything was done already
    r = CliRunner().invoke(app, ["predict", str(run_dir), str(photos), "--format", "csv"])
    assert r.exit_code == 0
    assert "label1" in r.stdout.splitlines()[0]  # the header; "skipped ..." goes to stderr


def test_folders_and_globs_come_in_name_order(tmp_path):
    """Predictions of a folder list its files in name order, subfolders in place, whatever
    order the filesystem returns them in (here: created in reverse)."""
    from transferlab.predict.sources import iter_sources

    names = ["z.jpg", "b/y.jpg", "b/a.jpg", "m.png", "a.jpg", "a/c.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    got = [p[len(str(tmp_path)) + 1 :] for p in iter_sources([str(tmp_path)])]
    assert got == ["a/c.jpg", "a.jpg", "b/a.jpg", "b/y.jpg", "m.png", "z.jpg"]
    globbed = [p[len(str(tmp_path)) + 1 :] for p in iter_sources([str(tmp_path / "**/*.jpg")])]
    assert globbed == sorted(globbed) and len(globbed) == 5
