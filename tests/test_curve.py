"""curve: nested subsets, the power law and its inversion, and one small end-to-end curve."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import transferlab
from test_api import photo_dataset
from test_backbones import make_local_dir
from transferlab.cli import app
from transferlab.data.prepared import Split
from transferlab.errors import TransferlabError
from transferlab.learning_curve import curve, nested_subset, parse_sizes
from transferlab.selection.curve_output import describe_estimate
from transferlab.selection.powerlaw import fit_power_law


def _split(per_class: dict[int, int]) -> Split:
    labels = np.concatenate([np.full(n, c) for c, n in per_class.items()])
    paths = [f"img{i}.jpg" for i in range(len(labels))]
    return Split(paths=paths, labels=labels, digests=[f"d{i}" for i in range(len(labels))])


def test_subsets_are_nested_per_class_and_seeded():
    split = _split({0: 30, 1: 12, 2: 20})
    small, large = nested_subset(split, 5, seed=3), nested_subset(split, 15, seed=3)
    assert set(small.paths) < set(large.paths)
    assert np.bincount(small.labels).tolist() == [5, 5, 5]
    assert np.bincount(large.labels).tolist() == [15, 12, 15]  # a smaller class gives all it has
    assert nested_subset(split, 5, seed=3).paths == small.paths
    assert nested_subset(split, 5, seed=4).paths != small.paths
    assert nested_subset(split, None, seed=3) is split
    i = split.paths.index(small.paths[0])  # paths, labels and digests stay aligned
    assert small.digests[0] == split.digests[i] and small.labels[0] == split.labels[i]


def test_parse_sizes():
    assert parse_sizes("10, 25,ALL") == [10, 25, "all"]
    for bad in ("10,x", "0", ",", "-5"):
        with pytest.raises(TransferlabError, match="--per-class"):
            parse_sizes(bad)


def test_power_law_recovers_a_known_curve_and_inverts_it():
    sizes = np.array([10.0, 25, 50, 100, 350])
    truth = 0.6 * sizes**-0.7 + 0.02
    law = fit_power_law(sizes, np.tile(truth[:, None], (1, 3)), n_eval=100_000, seed=0)
    assert (law.a, law.b, law.c) == pytest.approx((0.6, 0.7, 0.02), rel=1e-3)
    need = law.images_per_class_for(0.95)
    assert law.accuracy(need["images_per_class"]) == pytest.approx(0.95, abs=1e-9)
    assert not need["extrapolated"] and need["reachable"]
    lo, hi = need["ci95"]
    assert lo <= need["images_per_class"] <= hi  # a huge eval set: a narrow interval
    assert hi / lo < 1.2
    far = law.images_per_class_for(0.975)  # needs ~1500 per class: past the largest size
    assert far["extrapolated"] and far["images_per_class"] > 350
    never = law.images_per_class_for(0.99)  # beyond 1 - c: more of the same data won't do it
    assert not never["reachable"] and never["images_per_class"] is None
    assert fit_power_law(sizes[:2], np.tile(truth[:2, None], (1, 2)), n_eval=100) is None


def test_power_law_interval_widens_with_a_small_evaluation_set():
    sizes = np.array([10.0, 25, 50, 100])
    errors = np.tile((0.5 * sizes**-0.5 + 0.03)[:, None], (1, 2))
    narrow = fit_power_law(sizes, errors, n_eval=20_000, n_boot=100).images_per_class_for(0.9)
    wide = fit_power_law(sizes, errors, n_eval=100, n_boot=100).images_per_class_for(0.9)
    assert narrow["images_per_class"] == pytest.approx(wide["images_per_class"])
    assert (wide["ci95"][1] or np.inf) - wide["ci95"][0] > narrow["ci95"][1] - narrow["ci95"][0]


def test_estimates_say_which_side_of_the_data_they_extrapolate_to():
    law = fit_power_law(np.array([10.0, 30, 100]), np.array([[0.2], [0.1], [0.06]]), 10_000)
    inside, above, below = (law.images_per_class_for(a) for a in (0.88, 0.95, 0.7))
    assert not inside["extrapolated"] and "extrapolated" not in describe_estimate(inside)
    assert "beyond the largest size measured (100)" in describe_estimate(above)
    assert "below the smallest size measured (10)" in describe_estimate(below)
    assert "not reached" in describe_estimate(law.images_per_class_for(1 - law.c / 2))


@pytest.fixture
def data(tmp_path):
    """Red vs blue with heavy noise and a colour overlap, so small subsets do make mistakes."""
    return photo_dataset(tmp_path / "data", (("train", 12), ("val", 6), ("test", 10)), size=32)


def test_curve_writes_json_png_html_and_refuses_other_folders(data, tmp_path):
    out = tmp_path / "curve"
    tiny = make_local_dir(tmp_path / "weights" / "tiny", arch="mobilenetv2_035")  # 64 px input
    opts = {"backbone": f"local-dir:{tiny}", "engine": "torch", "workers": 0,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    result = curve(data, out=out, per_class=[2, 4, "all", 50], rungs=["features-linear"],
                   seeds=2, targets=[0.9], **opts)  # fmt: skip
    saved = json.loads((out / "curve.json").read_text())
    assert saved == json.loads(json.dumps(result.report))
    assert saved["per_class"] == [2, 4, "all"]  # 50 ≥ every class: the same as all
    (rung,) = saved["rungs"]
    assert [p["images_per_class"] for p in rung["points"]] == [2, 4, 12]
    for p in rung["points"]:
        assert [r["seed"] for r in p["runs"]] == [42, 43]
        assert [r["test"]["n"] for r in p["runs"]] == [20, 20]  # the same test set everywhere
        accs = [r["test"]["accuracy"] for r in p["runs"]]
        assert p["test"]["mean"] == pytest.approx(np.mean(accs))
        assert p["test"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    assert [r["n_train"] for r in rung["points"][0]["runs"]] == [4, 4]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "curve.html").read_text()
    assert "features-linear" in page and "data:image/png;base64," in page
    with pytest.raises(TransferlabError, match="holds a curve result already"):
        curve(data, out=out, per_class=[2], rungs=["features-linear"], seeds=1, **opts)

    # the same curve as a section of a run's report (the CLI: report RUN --curve OUT)
    transferlab.fit(data, out=tmp_path / "run", **opts)
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--curve", str(out)])
    assert r.exit_code == 0, r.output
    doc = (tmp_path / "run" / "report.html").read_text()
    section = doc.split('<section id="curve">', 1)[1].split("</section>", 1)[0]
    assert "features-linear" in section and "Power law" in section
    assert base64.b64encode((out / "curve.png").read_bytes()).decode() in section
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--curve", str(data)])
    assert "no learning curve here" in r.output  # the page is still written, the section says why
    with pytest.raises(TransferlabError, match="unknown rung"):
        curve(data, out=tmp_path / "c2", rungs=["features-linaer"], **opts)


def test_curve_cli_prints_the_table_and_says_when_there_is_no_law(data, tmp_path):
    tiny = make_local_dir(tmp_path / "weights" / "tiny", arch="mobilenetv2_035")
    common = ["--backbone", f"local-dir:{tiny}", "--workers", "0",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, ["curve", str(data), "--per-class", "10,x", *common])
    assert isinstance(r.exception, TransferlabError) and "--per-class" in str(r.exception)
    out = tmp_path / "c"
    r = runner.invoke(app, ["curve", str(data), "--out", str(out), "--rungs", "features-linear",
                            "--per-class", "3,all", "--seeds", "1", *common])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "features-linear" in r.output and "no power law" in r.output
    assert json.loads((out / "curve.json").read_text())["per_class"] == [3, "all"]
