"""End-to-end behaviour of the Python API on synthetic images and a tiny random backbone."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab
from transferlab.errors import TransferlabError
from transferlab.model import LazyNet

TINY = "mobilenetv2_035"  # random init: no network, ~0.4 M parameters


def _photo(path, colour, rng, size=48):
    """A noisy image dominated by one colour: separable by any reasonable features."""
    base = np.array(colour, dtype=np.float32)
    img = base + rng.normal(0, 25, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)


COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def photo_dataset(root, counts, *, size=48, seed=0):
    """``root/{split}/{red,blue}/*.jpg`` with ``counts`` = ((split, images per class), …):
    noisy images dominated by one colour."""
    rng = np.random.default_rng(seed)
    for split, n in counts:
        for cls, colour in COLOURS.items():
            for i in range(n):
                _photo(root / split / cls / f"{cls}.{i}.jpg", colour, rng, size=size)
    return root


@pytest.fixture
def split_data(tmp_path):
    return photo_dataset(tmp_path / "data", (("train", 12), ("val", 6), ("test", 6)))


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
    # the body is built on first use; evaluating cached images does not use it
    again = loaded.evaluate(split_data, split="test")
    assert again["accuracy"] == metrics["test"]["accuracy"]
    assert isinstance(loaded.saved._net, LazyNet)
    assert loaded.extractor().identity == clf.extractor().identity
    preds = loaded.predict([split_data / "test" / "red", split_data / "test" / "blue"], top_k=2)
    assert len(preds) == 12
    correct = [p["label"] == ("red" if "/red/" in p["path"] else "blue") for p in preds]
    assert np.mean(correct) >= 0.9
    assert all(abs(sum(prob for _, prob in p["top_k"]) - 1) < 1e-5 for p in preds)
    # built from model.json + body.safetensors, the body gives the fitted network's features
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.net.body(x), clf.net.body.eval()(x))


def test_save_keeps_runs_apart_unless_told_to_replace_one_whole(split_data, tmp_path):
    run = tmp_path / "run"
    _fit(split_data, tmp_path, out=run)
    loaded = transferlab.load(run)
    loaded.save(run)  # where it was loaded from: in place, and its lazy body still builds
    assert loaded.net.body is not None and transferlab.load(run).classes == loaded.classes

    other = tmp_path / "other"
    _fit(split_data, tmp_path, out=other, head="mlp")
    (other / "stale.csv").write_text("an old run's file\n")
    with pytest.raises(TransferlabError, match="holds a run already"):
        loaded.save(other)
    assert json.loads((other / "model.json").read_text())["head"]["kind"] == "mlp"
    loaded.save(other, overwrite=True)
    assert not (other / "stale.csv").exists() and not (tmp_path / "other.partial").exists()
    assert json.loads((other / "model.json").read_text())["head"]["kind"] == "linear"
    assert transferlab.load(other).predict_proba([split_data / "test"]).shape[1] == 2

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me\n")
    with pytest.raises(TransferlabError, match="holds other files"):
        loaded.save(tmp_path / "notes", overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(TransferlabError, match="is a file"):
        loaded.save(tmp_path / "a_file")
    shutil.rmtree(other)  # the folder it was last saved to is gone: another one still works
    (tmp_path / "third").mkdir()  # an empty folder is fine to save into
    assert loaded.save(tmp_path / "third") == tmp_path / "third"


def test_a_lazy_body_asked_for_by_many_threads_at_once_is_built_once(tmp_path):
    import threading
    import time

    built = []

    def make_body() -> torch.nn.Module:
        time.sleep(0.05)  # long enough for every thread to arrive while it builds
        built.append(torch.nn.Flatten())
        return built[-1]

    lazy = LazyNet(make_body, torch.nn.Identity(), tmp_path / "body.safetensors")
    nets = []
    threads = [threading.Thread(target=lambda: nets.append(lazy.eval())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    assert all(net is nets[0] for net in nets) and nets[0].body is built[0]


def test_a_body_file_replaced_after_load_is_refused_at_first_use(split_data, tmp_path):
    """A loaded run builds its body when first used: from the file it loaded, or not at all."""
    out = tmp_path / "run"
    _fit(split_data, tmp_path, out=out)
    loaded = transferlab.load(out)
    body = out / "body.safetensors"
    data = body.read_bytes()
    body.unlink()
    body.write_bytes(data)  # the same bytes in a new file (a re-fit with --overwrite)
    with pytest.raises(TransferlabError, match="changed or removed since the run was loaded"):
        loaded.net  # noqa: B018
    assert isinstance(transferlab.load(out).net, torch.nn.Module)


def test_features_past_the_ram_limit_are_memory_mapped_same_results(
    split_data, tmp_path, monkeypatch
):
    import transferlab.extract as extract

    a = _fit(split_data, tmp_path, out=tmp_path / "a", cache_dir=str(tmp_path / "c1"))
    monkeypatch.setattr(extract, "IN_RAM_MAX_BYTES", 0)
    made = []
    real = extract.FeatureExtractor._matrix
    monkeypatch.setattr(
        extract.FeatureExtractor,
        "_matrix",
        lambda self, n, d: made.append(real(self, n, d)) or made[-1],
    )
    b = _fit(split_data, tmp_path, out=tmp_path / "b", cache_dir=str(tmp_path / "c2"))
    assert made and all(isinstance(m, np.memmap) for m in made)
    assert (tmp_path / "a" / "head.safetensors").read_bytes() == (
        tmp_path / "b" / "head.safetensors"
    ).read_bytes()
    assert a.metrics["test"] == b.metrics["test"]
    # the mapped files were unlinked at once: nothing is left beside the cache's own folders
    assert not [p for p in (tmp_path / "c2").iterdir() if p.name.startswith("features-")]
    # no room on any disk for the file: the matrix is in RAM after all, the fit the same
    import os

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    made.clear()
    c = _fit(split_data, tmp_path, out=tmp_path / "c", cache_dir=str(tmp_path / "c3"))
    assert made and not any(isinstance(m, np.memmap) for m in made)
    assert c.metrics["test"] == a.metrics["test"]


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
    # Errors raised to Python name Python arguments; the CLI's name its flags.
    with pytest.raises(TransferlabError, match="^strategy='magic' is unknown"):
        _fit(split_data, tmp_path, strategy="magic")
    with pytest.raises(TransferlabError, match="^head='forest'"):
        _fit(split_data, tmp_path, head="forest")
    with pytest.raises(TransferlabError, match="^epochs='ten': give an integer >= 1"):
        _fit(split_data, tmp_path, epochs="ten", strategy="frozen")
    with pytest.raises(TransferlabError, match="^val_fraction and test_fraction must be"):
        _fit(split_data, tmp_path, val_fraction=1.5)
    with pytest.raises(TransferlabError, match="^--epochs 'ten'"):
        transferlab.FitConfig(epochs="ten").validate()  # the CLI's spelling, its default


def test_unknown_keyword_names_the_closest_options(split_data):
    with pytest.raises(TransferlabError, match="backbne='x'; did you mean backbone"):
        transferlab.fit(split_data, backbne="x")
    with pytest.raises(TransferlabError, match="valid: backbone, pretrained"):
        transferlab.fit(split_data, zzz=1)


def test_fit_has_a_real_signature_and_help():
    import inspect
    from dataclasses import fields

    params = inspect.signature(transferlab.fit).parameters
    for f in fields(transferlab.FitConfig):
        p = params[f.name]
        assert p.kind is p.KEYWORD_ONLY and p.default == f.default and p.annotation == f.type
        assert f.metadata["help"] in transferlab.fit.__doc__
    assert list(params)[:5] == ["data", "out", "config", "prepared", "verbose"]
    assert "options" not in params  # no **options left hiding them
    assert "epochs: int | None = None  Training epochs" in transferlab.fit.__doc__


def test_the_package_lists_its_api_and_imports_lazily():
    import subprocess
    import sys

    names = dir(transferlab)
    for name in ("fit", "load", "Classifier", "FitConfig", "explain", "report", "__version__"):
        assert name in names and name in transferlab.__all__
    code = "import sys, transferlab; dir(transferlab); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_repr_card_and_figures(split_data, tmp_path):
    from matplotlib.figure import Figure

    clf = _fit(split_data, tmp_path, out=tmp_path / "run")
    text = repr(clf)
    assert text.startswith("Classifier(backbone=mobilenetv2_035") and "classes=[blue, red]" in text
    acc = clf.metrics["test"]["accuracy"]
    lo, hi = clf.metrics["test"]["accuracy_ci95"]
    assert f"test accuracy={acc:.3f} (95% CI {lo:.3f}–{hi:.3f}), n=12" in text
    card = clf._repr_html_()
    assert "<table>" in card and "features + linear head" in card and str(tmp_path / "run") in card
    with pytest.raises(TransferlabError, match="report.html does not exist"):
        clf.report()
    for fig in (clf.plot_curves(), clf.plot_confusion(), clf.plot_reliability()):
        assert isinstance(fig, Figure)
        assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # shows inline in a notebook


def test_verbose_prints_a_line_per_phase_without_a_terminal(split_data, tmp_path, capsys):
    _fit(split_data, tmp_path, verbose=True)
    err = capsys.readouterr().err
    assert re.search(r"checking images: 48/48 in \d+\.\d s", err), err
    assert re.search(r"features \[train\]: 24/24 in", err), err
    _fit(split_data, tmp_path, verbose=False)
    assert capsys.readouterr().err == ""


def test_load_rejects_a_truncated_weights_file(split_data, tmp_path):
    out = tmp_path / "run"
    _fit(split_data, tmp_path, out=out)
    body = out / "body.safetensors"
    body.write_bytes(body.read_bytes()[:1000])
    with pytest.raises(TransferlabError, match="corrupt or truncated"):
        transferlab.load(out)


def test_the_data_summary_comes_first_and_names_carved_splits(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for cls, colour in COLOURS.items():  # class folders only: val and test are carved
        for i in range(10):
            _photo(tmp_path / "flat" / cls / f"{i}.jpg", colour, rng)
    from transferlab.config import FitConfig
    from transferlab.data.prepared import prepare_data

    prepare_data(tmp_path / "flat", FitConfig(workers=0))
    err = capsys.readouterr().err
    assert "found 20 images in 2 classes (blue, red)" in err
    assert "train 12, val 4, test 4; carved from all (val 20%, test 20%, seed 42)" in err


def test_a_new_run_never_lands_on_an_old_one(split_data, tmp_path):
    """An --out that is a file or a folder of other things is refused before any work; an
    existing run is replaced only with overwrite (or continued with resume)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(TransferlabError, match="is a file"):
        _fit(split_data, tmp_path, out=tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TransferlabError, match="holds other files"):
        _fit(split_data, tmp_path, out=tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    run = tmp_path / "run"
    _fit(split_data, tmp_path, out=run)
    with pytest.raises(TransferlabError, match=r"holds a run already; write to .*run2"):
        _fit(split_data, tmp_path, out=run)
    again = _fit(split_data, tmp_path, out=run, overwrite=True, head="mlp")
    assert transferlab.load(run).saved.head["kind"] == again.saved.head["kind"] == "mlp"
