"""Ensembles: the weighted average of members' probabilities, saved as a run folder that load,
predict, evaluate, explain, export (one ONNX graph) and serve take; chosen by auto on val."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import transferlab
from test_backbones import make_local_dir
from test_predict import make_dataset
from transferlab.api import Classifier
from transferlab.backbones import timm_body_recipe
from transferlab.config import FitConfig
from transferlab.data.discover import discover
from transferlab.data.images import load_image
from transferlab.data.prepared import Split
from transferlab.data.scan import file_digests
from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.model import ClassifierNet, EnsembleBody, EnsembleMember
from transferlab.preprocess import Preprocess
from transferlab.runs import SavedModel
from transferlab.selection.ensemble import (
    choose_weights,
    cross_fitted,
    ensemble_parts,
    fit_ensemble,
)
from transferlab.storage import state_digest
from transferlab.strategies import StrategyResult

WEIGHTS = [0.3, 0.7]
# Two members as unlike as real ones: another architecture, input size, eval crop and
# normalization (the smaller member keeps the centred 0.875 / 0.95 of the ensemble's input).
MEMBERS = (
    ("mobilenetv2_035", 64, 0.95, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("mobilenetv2_050", 48, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
)


def _member(data, arch, size, crop_pct, mean, std, seed) -> StrategyResult:
    """A random body + a nearest-centroid linear head on its training features (as
    test_predict.make_run builds a single model), at its own preprocessing."""
    import timm

    torch.manual_seed(seed)
    body = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    pre = Preprocess(input_size=(size, size), crop_pct=crop_pct, mean=mean, std=std)
    index = discover(data)
    rows = [s for s in index.samples if s.split == "train"]
    x = torch.from_numpy(np.stack([load_image(s.path, pre) for s in rows])).float() / 255
    with torch.no_grad():
        f = body((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    y = np.array([index.classes.index(s.label) for s in rows])
    spec = {"kind": "linear", "in_features": int(f.shape[1]), "num_classes": 2}
    head = build_head(spec)
    mu, sd = f.mean(0), f.std(0) + 1e-3
    z = (f - mu) / sd
    cent = torch.stack([z[torch.from_numpy(y == k)].mean(0) for k in range(2)])
    scale = 4.0 / z.shape[1]
    with torch.no_grad():
        head.standardize.mean.copy_(mu)
        head.standardize.std.copy_(sd)
        head.net.weight.copy_(cent * scale)
        head.net.bias.copy_(-0.5 * (cent**2).sum(1) * scale)
    record = {"spec": arch, "weights_hash": state_digest(body), "trained": False,
              "recipe": timm_body_recipe(arch, body)}  # fmt: skip
    return StrategyResult(ClassifierNet(body, head).eval(), pre, record, spec)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(data, members, ensemble run folder, config): the members ensembled with WEIGHTS."""
    tmp = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(tmp / "data")
    members = [_member(data, *m, seed=i) for i, m in enumerate(MEMBERS)]
    # ONNX Runtime: the ensemble body (in-graph resize included) on an exported runtime
    cfg = FitConfig(workers=0, cache_dir=str(tmp / "cache"), engine="onnxruntime")
    result = ensemble_parts(members, ["features", "features"]).result(WEIGHTS)
    index = discover(data)
    saved = SavedModel(
        net=result.net, classes=list(index.classes), preprocess=result.preprocess,
        body=result.body, head=result.head, strategy="ensemble", config=cfg.to_dict(),
    )  # fmt: skip
    clf = Classifier(saved)
    clf.data_summary = {"index": index.to_dict()}
    return data, members, clf.save(tmp / "run"), cfg


def _member_probs(member: StrategyResult, images: np.ndarray) -> np.ndarray:
    """A member's probabilities on uint8 images decoded at the ensemble's geometry, computed
    here from its own modules: cut to its own share of the ensemble's crop (centred), resized
    to its size, normalized with its mean/std."""
    pre = member.preprocess
    x = torch.from_numpy(images).float() / 255
    side = x.shape[-1]
    keep = round(side * min(1.0, pre.crop_pct / MEMBERS[0][2]))
    top = (side - keep) // 2
    x = x[..., top : top + keep, top : top + keep]
    if tuple(x.shape[-2:]) != pre.input_size:
        x = F.interpolate(x, size=pre.input_size, mode="bilinear", align_corners=False)
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(member.net(x), 1).double().numpy()


def _test_files(data) -> list[str]:
    return sorted(str(p) for p in (data / "test").rglob("*.jpg"))


def test_saved_ensemble_predicts_the_weighted_average_of_its_members(built):
    data, members, run, _ = built
    meta = json.loads((run / "model.json").read_text())
    assert meta["strategy"] == "ensemble" and meta["body"]["recipe"]["kind"] == "ensemble"
    assert meta["head"] == {**meta["head"], "kind": "average", "weights": WEIGHTS}
    assert [m["weight"] for m in meta["body"]["members"]] == WEIGHTS
    assert meta["preprocess"]["input_size"] == [64, 64]  # the largest member's
    assert [m["preprocess"]["mean"] for m in meta["body"]["recipe"]["members"]] == [
        list(m[3]) for m in MEMBERS
    ]
    clf = transferlab.load(run)
    files = _test_files(data)
    got = clf.predict_proba(files)
    images = np.stack([load_image(f, clf.saved.preprocess) for f in files])
    parts = [_member_probs(m, images) for m in members]
    np.testing.assert_allclose(got, WEIGHTS[0] * parts[0] + WEIGHTS[1] * parts[1], atol=1e-5)
    # The first member's geometry is the ensemble's: its part is what it predicts alone.
    alone = Classifier(SavedModel(members[0].net, clf.classes, members[0].preprocess,
                                  members[0].body, members[0].head, "features"))  # fmt: skip
    np.testing.assert_allclose(parts[0], alone.predict_proba(files), atol=1e-5)
    assert not np.allclose(parts[0], parts[1], atol=1e-3)  # so the weights matter
    report = clf.evaluate(data, split="test", tta="flip")
    assert report["tta"]["views"] == 2 and report["n"] == len(files)


class _Brightest(torch.nn.Module):
    """A stand-in body: each image's brightest value, as a (n, 1) feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(1, 2, 3)).unsqueeze(1)


def test_a_member_with_a_tighter_eval_crop_sees_its_own_crop_not_the_ensembles():
    """Lite2-like (260 px, crop_pct 0.89) beside a Lite0-like member (224 px, crop_pct 0.875):
    the ensemble's input is the wider crop, and the Lite0-like member keeps only its own
    centred share of it. A bright ring just outside that share must not reach it."""
    plain = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    wide = Preprocess(input_size=(260, 260), crop_pct=0.8904, **plain)
    tight = Preprocess(input_size=(224, 224), crop_pct=0.875, **plain)
    members = [EnsembleMember(_Brightest(), torch.nn.Identity(), pre) for pre in (wide, tight)]
    body = EnsembleBody(members)
    assert members[0].window == 1.0
    assert members[1].window == pytest.approx(0.875 / 0.8904)
    keep = round(260 * members[1].window)  # 256 of the 260 pixels
    x = torch.zeros(1, 3, 260, 260)
    x[..., :, : (260 - keep) // 2] = 1.0  # the columns only the wider crop has
    seen = body(x)[0]
    assert seen[0] == 1.0 and seen[1] == 0.0
    x[..., 130, 130] = 0.5  # the centre reaches both
    assert body(x)[0, 1] > 0.0


def test_weights_are_chosen_on_val_through_the_ensembles_own_forward(built):
    data, members, _, cfg = built
    index = discover(data)
    rows = [s for s in index.samples if s.split == "val"]
    paths = [s.path for s in rows]
    val = Split(paths, np.array([index.classes.index(s.label) for s in rows]), file_digests(paths))
    ens = fit_ensemble(members, ["features", "features"], val, cfg)
    pre = ensemble_parts(members, ["a", "b"]).preprocess
    images = np.stack([load_image(p, pre) for p in val.paths])
    logits = np.concatenate([np.log(_member_probs(m, images)) for m in members], axis=1)
    assert ens.weights == choose_weights(logits, val.labels, 2)[0]
    if ens.result is not None:  # both members count: the val probabilities come along
        p = ens.weights[0] * np.exp(logits[:, :2]) + ens.weights[1] * np.exp(logits[:, 2:])
        np.testing.assert_allclose(ens.result.probs["val"], p, atol=1e-5)


def test_choose_weights_minimises_val_log_loss():
    y = np.array([0, 0, 1, 1])
    sure, unsure = [4.0, -4.0], [0.5, -0.5]  # logits for class 0
    # member A is sure on the first half, B on the second: an even mix is best
    a = np.array([sure, sure, unsure[::-1], unsure[::-1]])
    b = np.array([unsure, unsure, sure[::-1], sure[::-1]])
    weights, acc, nll = choose_weights(np.concatenate([a, b], axis=1), y, 2)
    assert weights == [0.5, 0.5] and acc == 1.0 and nll < 0.2
    # a member that is worse everywhere gets no weight
    weights, *_ = choose_weights(np.concatenate([a, a * 0.1], axis=1), y, 2)
    assert weights == [1.0, 0.0]


def test_the_keep_decision_is_cross_fitted_on_val():
    """Two members of equal skill on 80 val images: weights fitted on val beat the better
    member there, and the cross-fitted score shows that gain was the fit."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 40)
    signal = np.where(y[:, None] == [0, 1], 1.0, -1.0)
    logits = np.concatenate([signal + rng.normal(0, 1, (80, 2)) for _ in range(2)], axis=1)
    weights, _, nll = choose_weights(logits, y, 2)
    alone = min(choose_weights(logits[:, 2 * i : 2 * i + 2], y, 1)[2] for i in range(2))
    assert min(weights) > 0 and nll < alone
    assert cross_fitted(logits, y, 2)[1] > alone
    same = np.concatenate([logits[:, :2]] * 2, axis=1)  # one member twice: nothing to fit
    assert cross_fitted(same, y, 2) == pytest.approx(choose_weights(same, y, 2)[1:])


def test_export_is_one_checked_onnx_graph_and_predict_on_it_matches_the_run(built, tmp_path):
    from transferlab.export import export_model, read_metadata

    data, _, run, _ = built
    out = tmp_path / "ens.onnx"
    report = export_model(run, "onnx", out, threads=1)
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-4
    meta = read_metadata(out)
    assert meta["input"]["shape"] == ["batch", 3, 64, 64] and meta["strategy"] == "ensemble"
    assert [m["weight"] for m in meta["ensemble"]["members"]] == WEIGHTS
    assert [m["input_size"] for m in meta["ensemble"]["members"]] == [[64, 64], [48, 48]]
    cmd = [sys.executable, "-m", "transferlab", "predict", str(out), str(data / "test"),
           "--format", "jsonl"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    clf = transferlab.load(run)
    expected = clf.predict_proba([row["path"] for row in rows])
    assert [row["label"] for row in rows] == [clf.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([row["probability"] for row in rows], expected.max(1), atol=1e-4)


def test_serve_and_explain_take_an_ensemble(built, tmp_path):
    from fastapi.testclient import TestClient

    from transferlab.evaluation.explain import explain_files, find_target_layer
    from transferlab.serve import create_app

    data, _, run, _ = built
    jpeg = _test_files(data)[-1]
    with TestClient(create_app(run)) as client:
        r = client.post("/predict", files=[("file", ("x.jpg", Path(jpeg).read_bytes()))])
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        assert client.get("/model").json()["strategy"] == "ensemble"
    clf = transferlab.load(run)
    p = clf.predict_proba([jpeg])[0]
    assert pred["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    # the map reads the member that weighs most (the second), through the ensemble's output
    name, _ = find_target_layer(clf.net, (64, 64))
    assert name.startswith("body.members.1.body.")
    written = explain_files(clf, [jpeg], tmp_path / "explain", maps=False)
    assert [w.name for w in written] == [f"{Path(jpeg).stem}_gradcam.png"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["head"].update(weights=[0.5, 0.6]), "sum to 1"),
        (lambda m: m["body"]["recipe"].pop("members"), "lists its members"),
        (
            lambda m: m["body"]["recipe"]["members"][1]["head"].update(num_classes=3),
            "members.1.head.num_classes",
        ),  # fmt: skip
        (
            lambda m: m["body"]["recipe"]["members"][0]["preprocess"].update(std=[0, 1, 1]),
            "std",
        ),  # fmt: skip
    ],
)
def test_a_damaged_ensemble_description_is_one_clear_error(built, tmp_path, edit, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(built[2], run)
    meta = json.loads((run / "model.json").read_text())
    edit(meta)
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(TransferlabError, match=message):
        SavedModel.load(run)


def test_auto_keeps_an_ensemble_that_beats_every_single_model_on_val(tmp_path, monkeypatch):
    """Two offline backbones of other sizes and normalizations, on data where neither is
    sure: auto's ensemble (fine-tuning left out) beats both on val and is what fit saves."""
    from PIL import Image

    from conftest import tiny_fit_options
    from transferlab.selection import auto

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 10), ("test", 4)):
        for label, colour in (("a", (132, 128, 124)), ("b", (124, 128, 132))):
            for i in range(n):
                img = np.array(colour, np.float32) + rng.uniform(-80, 80)
                img = img + rng.normal(0, 30, (40, 40, 3))
                path = tmp_path / "data" / split / label / f"{label}_{split}_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)
    dirs = [make_local_dir(tmp_path / "w" / arch, arch=arch, size=size, seed=i)
            for i, (arch, size) in enumerate((("mobilenetv2_035", 64),
                                              ("mobilenetv3_small_050", 48)))]  # fmt: skip
    monkeypatch.setattr(auto, "_candidates", lambda: [f"local-dir:{d}" for d in dirs])
    monkeypatch.setattr(auto, "_finetune_estimate", lambda *_: math.inf)
    opts = tiny_fit_options(tmp_path)
    del opts["backbone"], opts["pretrained"]  # auto's candidates: the two folders above
    run = tmp_path / "run"
    clf = transferlab.fit(tmp_path / "data", out=run, strategy="auto", time_budget=600,
                          verbose=False, **opts)  # fmt: skip
    record = json.loads((run / "auto.json").read_text())
    ens = record["ensemble"]
    assert ens["tried"] and ens["kept"] and ens["reason"].startswith("kept")
    singles = [r for r in record["tried"] if r["strategy"] == "features"]
    assert len(singles) == 2 and all(  # judged out of fold: fitted weights flatter it on val
        (ens["cv_val_accuracy"], -ens["cv_val_log_loss"]) > (r["val_accuracy"], -r["val_log_loss"])
        for r in singles
    )
    assert record["chosen"]["strategy"] == "ensemble" == clf.saved.strategy
    assert not any("test" in key for r in record["tried"] for key in r)  # chosen on val only
    loaded = transferlab.load(run)
    assert loaded.saved.head["weights"] == ens["weights"] and min(ens["weights"]) > 0
    assert loaded.metrics["val"]["accuracy"] == pytest.approx(ens["val_accuracy"])
    files = sorted(str(p) for p in (tmp_path / "data" / "val").rglob("*.jpg"))
    val_probs = loaded.predict_proba(files)  # what was chosen is what was saved
    labels = np.array([0 if "/a/" in f else 1 for f in files])
    assert (val_probs.argmax(1) == labels).mean() == pytest.approx(ens["val_accuracy"])
    from transferlab.evaluation.report import build_report

    page = build_report(run, gradcam=0).read_text()
    assert "Ensemble (probabilities averaged" in page and "kept:" in page
