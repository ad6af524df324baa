"""The HTML report: every section present, self-contained (data: URIs only), small, degrading
gracefully; the CLI commands ``report``/``compare`` and ``evaluate --report``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import transferlab
from transferlab.cli_see import register
from transferlab.evaluation import explain
from transferlab.evaluation.analysis import load_predictions
from transferlab.evaluation.report import build_report
from transferlab.ladder import ladder
from transferlab.runs import PREDICTIONS_FILE

TINY = "mobilenetv2_035"
SECTIONS = (
    "data",
    "config",
    "curves",
    "metrics",
    "confusion",
    "calibration",
    "top-losses",
    "suspects",
    "gradcam",
)
MAX_BYTES = 15_000_000
MAX_SECONDS = 10.0


def _photo(path, colour, rng, size=40):
    img = np.array(colour, dtype=np.float32) + rng.normal(0, 70, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs on one noisy synthetic dataset (so there are mistakes to show) + a ladder."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, n in (("train", 10), ("val", 6), ("test", 6)):
        for cls, colour in {"cat": (150, 110, 90), "dog": (100, 110, 150)}.items():
            for i in range(n):
                _photo(data / split / cls / f"{cls}.{i}.jpg", colour, rng)
    common = dict(
        backbone=TINY, pretrained=False, engine="torch", cache_dir=str(root / "cache"), workers=0
    )
    # The real ladder writes the ladder.json the report reads: two cheap rungs of it.
    ladder(data, out=root / "ladder", rungs=["features-linear", "features-mlp"], **common)
    lin_dir, mlp_dir = root / "ladder" / "features-linear", root / "ladder" / "features-mlp"
    t0 = time.perf_counter()
    report = build_report(lin_dir)  # what every fit does once wired
    seconds = time.perf_counter() - t0
    build_report(mlp_dir, gradcam=0)
    t0 = time.perf_counter()
    ladder_report = build_report(root / "ladder")
    ladder_seconds = time.perf_counter() - t0
    return {
        "root": root,
        "data": data,
        "lin": lin_dir,
        "mlp": mlp_dir,
        "metrics": json.loads((lin_dir / "metrics.json").read_text()),
        "report": report,
        "seconds": seconds,
        "ladder_report": ladder_report,
        "ladder_seconds": ladder_seconds,
    }


def _srcs(doc):
    return re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', doc)


def test_report_has_every_section_and_is_self_contained(runs):
    path = runs["report"]
    assert path == runs["lin"] / "report.html"
    doc = path.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in doc, sid
    assert "unavailable" not in doc.replace(".unavailable{", "")  # no section failed
    # offline: every image is embedded, every link is an in-page anchor, nothing is fetched
    refs = _srcs(doc)
    imgs = re.findall(r"<img\b[^>]*>", doc)
    assert len(imgs) >= 20  # figures + thumbnails + galleries + Grad-CAM pairs
    assert all(
        r.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")) for r in refs
    )
    assert not any("http" in r for r in refs)
    assert "<script" not in doc and "<link" not in doc and "@import" not in doc
    assert "url(" not in doc
    assert path.stat().st_size < MAX_BYTES
    assert runs["seconds"] < MAX_SECONDS


def test_report_content_matches_the_run(runs):
    doc = runs["report"].read_text()
    m = runs["metrics"]["test"]
    lo, hi = m["accuracy_ci95"]
    assert f"{100 * m['accuracy']:.1f}%" in doc and f"{100 * lo:.1f}%" in doc
    assert "Most confused pairs" in doc or "No mistakes" in doc
    assert "Temperature scaling fitted on val would give T =" in doc
    assert "the strength with the lowest validation loss is kept" in doc  # a linear head
    assert "Samples per class" in doc and re.search(r"<figcaption>dog\.\d+\.jpg<", doc)
    # thumbnails are small JPEGs: none of the embedded JPEGs is big
    jpegs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", doc)
    assert jpegs and max(len(j) for j in jpegs) * 3 / 4 < 60_000
    # per-image predictions were written for compare_runs
    pred = load_predictions(runs["lin"], "test")
    assert len(pred["paths"]) == m["n"]
    acc = np.mean([a == b for a, b in zip(pred["labels"], pred["predicted"], strict=True)])
    assert acc == pytest.approx(m["accuracy"])


def test_ladder_report_compares_rungs_with_mcnemar(runs):
    path = runs["ladder_report"]
    assert path == runs["root"] / "ladder" / "report.html"
    doc = path.read_text()
    assert '<section id="ladder">' in doc
    assert "Paired test (McNemar)" in doc
    assert ">features-linear<" in doc and ">features-mlp<" in doc
    assert "frozen pretrained base, cached features, linear head" in doc  # rung description
    for sid in SECTIONS:  # the best rung is detailed below the comparison
        assert f'<section id="{sid}">' in doc
    assert path.stat().st_size < MAX_BYTES
    assert runs["ladder_seconds"] < MAX_SECONDS


def test_report_degrades_when_images_moved_and_gradcam_fails(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["lin"], run)
    summary = json.loads((run / "data.json").read_text())
    summary["index"]["root"] = str(tmp_path / "moved-away")
    (run / "data.json").write_text(json.dumps(summary))
    (run / PREDICTIONS_FILE).unlink()
    path = build_report(run)
    doc = path.read_text()
    assert doc.count('class="unavailable"') >= 3  # calibration, top losses, Grad-CAM, ...
    assert "missing" in doc
    for sid in ("config", "curves", "metrics", "confusion"):  # built from the run's JSON
        section = doc.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "unavailable" not in section
    assert not (run / PREDICTIONS_FILE).exists()

    # Relocated with --data, everything is back except what we break on purpose.
    def broken(*a, **k):
        raise RuntimeError("no gradients here")

    monkeypatch.setattr(explain, "grad_cam", broken)
    for kept in (runs["root"] / "cache" / "figures").glob("*.json"):
        kept.unlink()  # the CAMs the fixture's reports computed (and cached) must be redone
    doc = build_report(run, data=runs["data"]).read_text()
    gradcam = doc.split('<section id="gradcam">')[1].split("</section>")[0]
    assert "unavailable" in gradcam and "no gradients here" in gradcam
    top = doc.split('<section id="top-losses">')[1].split("</section>")[0]
    assert "unavailable" not in top


def test_warm_report_reads_no_image_bytes_for_digests_and_samples_the_label_search(
    runs, tmp_path, monkeypatch
):
    from transferlab.config import FitConfig
    from transferlab.data.prepared import prepare_data
    from transferlab.evaluation import analysis
    from transferlab.evaluation.report.context import RunContext
    from transferlab.evaluation.report.render import render
    from transferlab.evaluation.report.sections_errors import suspects_section

    # a re-run's scan: the (no longer freshly written) images go into the scan index
    old = time.time_ns() - 3600 * 10**9
    for p in runs["data"].rglob("*.jpg"):
        os.utime(p, ns=(old, old))
    prepare_data(runs["data"], FitConfig(cache_dir=str(runs["root"] / "cache"), workers=0))
    # every streamed file hash (the digests of a run's recorded images) goes through this
    real_hash = hashlib.file_digest

    def hashing(fh, *a):
        assert str(runs["data"]) not in fh.name, f"read {fh.name}"
        return real_hash(fh, *a)

    monkeypatch.setattr(hashlib, "file_digest", hashing)
    doc = build_report(runs["lin"], out=tmp_path / "r.html", gradcam=0, write_predictions=False)
    suspects = doc.read_text().split('<section id="suspects">')[1].split("</section>")[0]
    assert "unavailable" not in suspects and "stratified sample" not in suspects

    fetched: list[int] = []
    real = analysis.split_features
    monkeypatch.setattr(
        analysis, "split_features", lambda clf, sp: fetched.append(len(sp)) or real(clf, sp)
    )
    data = suspects_section(RunContext(runs["lin"], None), 4, max_rows=6)
    assert fetched == [10]  # 5 per class (one per fold) of the 20: only those features read
    assert data["sampled"] == {"n": 10, "of": 20, "seed": 0}
    html = render("suspects.html", **data)
    assert "stratified sample of 10 of the 20 training images" in html


def _evaluate(run, data, report_dir, *options):
    """``transferlab evaluate RUN DATA --report DIR [options]``: its JSON report."""
    app = typer.Typer()
    register(app)
    out = report_dir.parent / f"{report_dir.name}.json"
    args = ["evaluate", str(run), str(data), "--report", str(report_dir), "--json", str(out)]
    res = CliRunner().invoke(app, [*args, *options])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_evaluate_calibrates_tta_and_reports(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["mlp"], run)
    res = _evaluate(run, runs["data"], tmp_path / "rep", "--tta", "flip", "--calibrate")
    t = res["calibration"]["temperature"]
    assert json.loads((run / "model.json").read_text())["temperature"] == pytest.approx(t)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(t)
    assert metrics["tta"]["views"] == 2 and metrics["tta"]["split"] == "test"
    assert metrics["tta"]["plain"]["accuracy"] == pytest.approx(res["accuracy"])
    # calibration changes probabilities, never the decisions
    assert res["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    doc = (tmp_path / "rep" / "report.html").read_text()
    assert "Temperature scaling (T = " in doc and "Test-time augmentation" in doc
    assert transferlab.load(run).saved.temperature == pytest.approx(t)


def test_cli_report_and_compare(runs, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(runs["lin"]), "--out", str(out), "--gradcam", "0"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and '<section id="gradcam">' not in out.read_text()
    res = runner.invoke(
        app,
        [
            "compare",
            str(runs["lin"]),
            str(runs["mlp"]),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "McNemar" in res.output
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert cmp["shared_test"] is True and (tmp_path / "c" / "compare.png").is_file()


# --------------------------------------------------------------------------------------------
# fixed-input-size models, data given explicitly, best rung, run files


def test_scratch_run_report_has_a_working_gradcam(runs, tmp_path):
    """A scratch CNN (Flatten + Dense) takes one input size only: Grad-CAM must trace at it.

    80 px, not 64: the report used to trace the layer choice at 64 px, which a 64 px model
    takes by chance; any other size failed with a matmul shape error."""
    run = tmp_path / "scratch"
    clf = transferlab.fit(
        runs["data"],
        out=run,
        strategy="scratch-basic",
        image_size=80,
        epochs=1,
        engine="torch",
        cache_dir=str(runs["root"] / "cache"),
        workers=0,
    )
    assert tuple(clf.saved.preprocess.input_size) == (80, 80)
    doc = build_report(run, classifier=clf, top_k=4, thumbnails=1).read_text()
    gradcam = doc.split('<section id="gradcam">')[1].split("</section>")[0]
    assert "unavailable" not in gradcam
    assert "<code>body.pool3</code>" in gradcam and gradcam.count("<figure>") == 4


def _with_truncated_jpeg(data, dest):
    shutil.copytree(data, dest)
    bad = dest / "test" / "cat" / "broken.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(bad, quality=90)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return dest, bad


def test_report_evaluate_and_compare_on_given_data_skip_a_corrupt_image(
    runs, tmp_path, monkeypatch
):
    from transferlab import api
    from transferlab.evaluation import run_data

    data, bad = _with_truncated_jpeg(runs["data"], tmp_path / "data")
    doc = build_report(runs["lin"], data=data, out=tmp_path / "r" / "report.html").read_text()
    for sid in ("data", "calibration", "top-losses", "suspects", "gradcam"):
        section = doc.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "unavailable" not in section, sid
    data_section = doc.split('<section id="data">')[1].split("</section>")[0]
    assert "Skipped files in" in data_section and f"<td>{bad}</td>" in data_section
    assert "truncated" in data_section

    # evaluate --report: one scan of the folder, shared by the evaluation and the report
    scans = []
    real = run_data.prepare_run_data

    def counting(*a, **k):
        scans.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(api, "prepare_run_data", counting)  # where evaluate_run scans
    monkeypatch.setattr(run_data, "prepare_run_data", counting)  # where the report would
    run = tmp_path / "run"
    shutil.copytree(runs["lin"], run)
    res = _evaluate(run, data, tmp_path / "rep")
    assert res["n"] == runs["metrics"]["test"]["n"]  # the good test images, all
    assert scans == [data]
    rep = (tmp_path / "rep" / "report.html").read_text()
    assert f"<td>{bad}</td>" in rep and "report section unavailable" not in rep

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(
        app,
        ["compare", str(runs["lin"]), str(runs["mlp"]), "--data", str(data)]
        + ["--out", str(tmp_path / "c")],
    )
    assert res.exit_code == 0, res.output
    assert "McNemar" in res.output and "skipped 1 unusable image(s)" in res.output
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [s["path"] for s in cmp["skipped"]] == [str(bad)]


def test_best_rung_is_chosen_on_val_only(tmp_path):
    from transferlab.evaluation.report import best_rung
    from transferlab.evaluation.report.rungs import best_rung_dir

    def rung(name, val=None, test=None, seeds=None):
        r = {"name": name, "run_dir": str(tmp_path / name)}
        if val is not None:
            r["val"] = {"accuracy": val, "accuracy_ci95": [0, 1]}
            if seeds is not None:
                r["val"]["across_seeds"] = {"mean": seeds, "sd": 0.01}
        if test is not None:
            r["test"] = {"accuracy": test, "accuracy_ci95": [0, 1]}
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "model.json").write_text("{}")
        return r

    # test accuracy never decides, not even for a rung without val
    lad = {"rungs": [rung("a", 0.8, 0.7), rung("b", 0.7, 0.99), rung("c", None, 1.0)]}
    assert best_rung(lad)["name"] == "a"
    assert best_rung_dir(lad) == tmp_path / "a"  # the report details the same rung
    # ties: the earlier rung in ladder order
    lad = {"rungs": [rung("a", 0.8, 0.5), rung("b", 0.8, 0.9)]}
    assert best_rung(lad)["name"] == "a" and best_rung_dir(lad) == tmp_path / "a"
    # several seeds: the mean over seeds, not the first seed's accuracy
    lad = {"rungs": [rung("a", 0.9, seeds=0.7), rung("b", 0.8, seeds=0.75)]}
    assert best_rung(lad)["name"] == "b"
    # no val at all: no best rung; the report still details the first rung on disk
    lad = {"rungs": [rung("a", None, 0.5), rung("b", None, 0.9)]}
    assert best_rung(lad) is None and best_rung_dir(lad) == tmp_path / "a"
    # the best rung's folder is gone: the next best one on disk
    lad = {"rungs": [rung("a", 0.9), rung("b", 0.8)]}
    shutil.rmtree(tmp_path / "a")
    assert best_rung(lad)["name"] == "a" and best_rung_dir(lad) == tmp_path / "b"


def test_corrupt_run_files_are_errors_naming_the_file(runs, tmp_path):
    from transferlab.errors import TransferlabError
    from transferlab.evaluation.report import load_ladder

    run = tmp_path / "run"
    shutil.copytree(runs["mlp"], run)
    clf = transferlab.load(run)
    (run / "history.json").write_text('[{"epoch": 1,')
    doc = build_report(run, classifier=clf, gradcam=0, thumbnails=0).read_text()
    curves = doc.split('<section id="curves">')[1].split("</section>")[0]
    assert "unavailable" in curves and "history.json: unreadable JSON" in curves
    for sid in ("data", "metrics", "confusion", "calibration"):  # the rest is still there
        section = doc.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "unavailable" not in section, sid
    lad = tmp_path / "ladder"
    lad.mkdir()
    (lad / "ladder.json").write_text("{not json")
    with pytest.raises(TransferlabError, match=r"ladder\.json: unreadable JSON"):
        load_ladder(lad)
    with pytest.raises(TransferlabError, match="no ladder.json"):
        load_ladder(tmp_path / "empty")


def test_templates_escape_user_text():
    """Autoescaping: names and descriptions from files are shown as text, never as markup."""
    from transferlab.evaluation.report.render import render
    from transferlab.evaluation.report.sections_ladder import ladder_section

    evil = '<script>alert("x")</script>'
    lad = {
        "rungs": [
            {
                "name": evil,
                "description": "cats & dogs",
                "val": {"accuracy": 0.9, "accuracy_ci95": [0.8, 0.95]},
            }
        ]
    }
    doc = render("ladder.html", **ladder_section(lad))
    assert "<script" not in doc and "&lt;script&gt;alert(&#34;x&#34;)" in doc
    assert "<td>cats &amp; dogs</td>" in doc
    assert '<td>90.0% <span class="muted">[80.0% – 95.0%]</span></td>' in doc  # ours is markup
    notice = render("unavailable.html", reason="<img src=x onerror=alert(1)>")
    assert "<img" not in notice and "&lt;img" in notice


def test_unchanged_figures_are_never_drawn_twice(runs, tmp_path, monkeypatch):
    """The report's figures are kept in the run's cache by a digest of their inputs: a second
    report draws none (and reads the same PNGs); a changed input, or a damaged cached PNG, is
    drawn anew."""
    from transferlab.evaluation import plots
    from transferlab.evaluation.report.render import FIGURES

    figures = runs["root"] / "cache" / FIGURES
    assert len(list(figures.glob("*.png"))) >= 4  # curves, classes, confusion, reliability
    drawn = []
    real = plots.figure_bytes
    monkeypatch.setattr(plots, "figure_bytes", lambda fig, fmt="png": drawn.append(1) or real(fig))
    before = runs["report"].read_text()
    again = build_report(runs["lin"], out=tmp_path / "again.html")
    assert drawn == []
    pngs = lambda doc: re.findall(r'src="(data:image/png;base64,[^"]+)"', doc)  # noqa: E731
    assert pngs(again.read_text()) == pngs(before)

    ours = [p for p in figures.glob("*.png") if base64.b64encode(p.read_bytes()).decode() in before]
    assert len(ours) >= 4
    ours[0].write_bytes(ours[0].read_bytes()[:100])  # truncated: not trusted
    build_report(runs["lin"], out=tmp_path / "third.html")
    assert len(drawn) == 1 and ours[0].read_bytes().endswith(b"IEND\xaeB`\x82")

    history = runs["lin"] / "history.json"
    rows = json.loads(history.read_text())
    rows[0]["train_loss"] = float(rows[0].get("train_loss") or 0.0) + 1.0
    copy = tmp_path / "run"
    shutil.copytree(runs["lin"], copy)
    (copy / "history.json").write_text(json.dumps(rows))
    build_report(copy, out=tmp_path / "fourth.html")
    assert len(drawn) == 2  # the learning curves only


def test_split_logits_streams_the_cache_and_extracts_only_missing_chunks(runs, monkeypatch):
    """Scoring reads cached features a chunk at a time (memory bounded by a chunk, not the
    split), keeps only logits, and extracts just the chunk whose image the cache lacks."""
    from transferlab.data.prepared import Split
    from transferlab.evaluation import scoring
    from transferlab.evaluation.run_data import resolve_splits
    from transferlab.evaluation.scoring import head_logits, split_logits

    clf = transferlab.load(runs["lin"])
    test = resolve_splits(runs["lin"], ("test",))["test"]
    whole = head_logits(clf, scoring.split_features(clf, test))
    extracted: list[int] = []
    real = scoring.split_features
    monkeypatch.setattr(
        scoring, "split_features", lambda c, sp: extracted.append(len(sp)) or real(c, sp)
    )
    np.testing.assert_allclose(split_logits(clf, test, rows=5), whole, atol=1e-6)
    assert extracted == []  # every chunk from the cache

    # An image the cache has never seen (same pixels, new bytes): only its chunk is extracted.
    src = test.paths[7]
    other = runs["root"] / "fresh.jpg"
    Image.open(src).save(other, quality=97)
    moved = Split([*test.paths[:7], str(other), *test.paths[8:]], test.labels, list(test.digests))
    moved.digests[7] = hashlib.sha256(other.read_bytes()).hexdigest()
    got = split_logits(clf, moved, rows=5)
    assert extracted == [5]  # rows 5..9 only
    np.testing.assert_allclose(np.delete(got, 7, 0), np.delete(whole, 7, 0), atol=1e-6)
    assert got.shape == whole.shape and not np.allclose(got[7], whole[7], atol=1e-9)
