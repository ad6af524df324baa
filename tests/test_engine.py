"""Training engine on tiny synthetic data: learning, freezing, BN policy, LR groups, checkpoints,
resume, BN recalibration, and the frozen / finetune / scratch strategies end to end.

Everything runs a random ``test_efficientnet`` (99k parameters, 6 stages, BatchNorm) at 32 px on
colour-separable JPEGs made in tmp_path; one torch thread (shared 2-core box). The helpers here
are imported by test_resume.py and test_ddp.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.nn import functional as F

from conftest import make_image
from transferlab import engine
from transferlab.api import feature_extractor
from transferlab.augment import build_transform
from transferlab.backbones import Backbone
from transferlab.config import FitConfig
from transferlab.data.images import file_digest, open_rgb
from transferlab.data.prepared import Split
from transferlab.engine import (
    Stage,
    StagePlan,
    apply_plan,
    build_optimizer,
    grad_boundary,
    has_placeholder_bn,
    load_checkpoint,
    plan_stage,
    recalibrate_bn,
    set_train_mode,
    train,
)
from transferlab.errors import TransferlabError
from transferlab.heads import build_head
from transferlab.model import ClassifierNet
from transferlab.preprocess import Preprocess
from transferlab.runs import SavedModel
from transferlab.strategies import STRATEGIES, StrategyContext
from transferlab.training import class_weights, cross_entropy, lr_factor

ARCH = "test_efficientnet"
PRE = Preprocess(input_size=(32, 32), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
COLOURS = ((200, 40, 40), (40, 60, 200))


@pytest.fixture(autouse=True)
def _quiet_and_isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_QUIET", "1")
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# helpers (also used by test_resume.py and test_ddp.py)


def make_split(root: Path, name: str, n: int, seed: int = 0) -> Split:
    """``n`` JPEGs alternating between a reddish and a bluish class (noisy, varied sizes)."""
    paths, labels = [], []
    for i in range(n):
        c = i % 2
        p = make_image(
            root / name / f"{c}_{i}.jpg", (40 + 2 * (i % 5), 34), color=COLOURS[c], seed=seed + i
        )
        paths.append(str(p))
        labels.append(c)
    digests = [file_digest(p) for p in paths]
    return Split(paths, np.array(labels, dtype=np.int64), digests)


@torch.no_grad()
def evaluate(net: torch.nn.Module, split: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``net`` on ``split`` with the eval transform."""
    transform = build_transform("none", PRE, train=False)
    x = torch.stack([transform(open_rgb(p)) for p in split.paths])
    y = torch.from_numpy(split.labels)
    net.eval()
    logits = net(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def tiny_net(seed: int = 0, num_classes: int = 2) -> ClassifierNet:
    torch.manual_seed(seed)
    body = timm.create_model(ARCH, pretrained=False, num_classes=0)
    spec = {"kind": "linear", "in_features": body.num_features, "num_classes": num_classes}
    head = build_head(spec)
    return ClassifierNet(body, head)


def tiny_config(**kw) -> FitConfig:
    base = {"batch_size": 8, "workers": 0, "patience": None, "seed": 0, "deterministic": True}
    return FitConfig(**{**base, **kw})


def fold_bn(body: torch.nn.Module, seed: int = 0) -> None:
    """Make BN look like the shared MobileNets: placeholder stats, folded bias in beta."""
    g = torch.Generator().manual_seed(seed)
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1 - m.eps)
            m.weight.data.fill_(1.0)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Split, Split]:
    root = tmp_path_factory.mktemp("engine-data")
    return make_split(root, "train", 24), make_split(root, "val", 11, seed=100)


# --------------------------------------------------------------------------------------------
# training


def test_train_improves_val_accuracy_and_writes_history(data, tmp_path):
    tr, va = data
    net = tiny_net()
    init_loss, _ = evaluate(net, va)
    res = train(
        net,
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(),
        out=tmp_path / "run",
        stages=[Stage("all", 4, "all", lr=1e-2, bn="train")],
        augment="light",
    )
    assert res.net is net and not net.training
    assert res.epochs == 4 and len(res.history) == 4 and res.stop_reason == "completed"
    best = res.history[res.best_epoch - 1]
    assert best["val_loss"] == min(r["val_loss"] for r in res.history) < init_loss
    assert best["val_acc"] >= 0.9
    loss, acc = evaluate(net, va)  # the returned net is the best epoch's, as reported
    assert acc == pytest.approx(best["val_acc"]) and loss == pytest.approx(best["val_loss"], 1e-5)
    assert res.trainable_params == sum(p.numel() for p in net.parameters())
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert lines[0].split(",")[:8] == [
        "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"
    ]  # fmt: skip
    assert len(lines) == 5
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert state_equal(load_checkpoint(ckpt / "best.ckpt")["model"], net.state_dict())


def test_frozen_stages_stay_bit_identical_with_frozen_bn(data, tmp_path):
    tr, va = data
    net = tiny_net(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    top = engine.body_stages(net.body)[-1][1]
    top_params = {id(p) for p in top.parameters()}
    train(
        net,
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(),
        out=tmp_path,
        stages=[Stage("top1", 2, 1, lr=5e-2, lr_mult=1.0, bn="frozen")],
        augment="none",
    )
    after = net.state_dict()
    names = dict(net.named_parameters())
    for k, v in after.items():
        is_top = k in names and id(names[k]) in top_params
        if k.startswith("head.net") or is_top:
            continue
        assert torch.equal(v, before[k]), k  # frozen weights and every BN buffer unchanged
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("head.net"))
    changed_top = [n for n, p in top.named_parameters() if p.ndim > 1]
    assert changed_top and any(
        not torch.equal(after[k], before[k])
        for k in after
        if k in names and id(names[k]) in top_params
    )


def test_plan_groups_honour_lr_mult_and_decay_split():
    net = tiny_net()
    cfg = tiny_config(weight_decay=0.05)
    plan = plan_stage(net, Stage("s", 1, 2, lr=0.01, lr_mult=0.1, bn="frozen"), cfg)
    groups = {g["name"]: g for g in plan.groups}
    assert set(groups) == {"head", "head_no_decay", "body", "body_no_decay"}
    assert groups["head"]["lr"] == 0.01 and groups["body"]["lr"] == pytest.approx(0.001)
    assert groups["body_no_decay"]["weight_decay"] == 0 and groups["body"]["weight_decay"] == 0.05
    top2 = engine.body_stages(net.body)[-2:]
    want = {id(p) for _, m in top2 for p in m.parameters()} | {id(p) for p in net.head.parameters()}
    named = dict(net.named_parameters())
    assert {id(named[n]) for n in plan.trainable} == want
    assert plan.grad_from == "body.blocks.3"  # the first module of the lower unfrozen stage
    opt = build_optimizer(net, plan, cfg)
    assert [g["base_lr"] for g in opt.param_groups] == [g["lr"] for g in plan.groups]
    assert apply_plan(net, plan) == sum(p.numel() for p in net.parameters() if id(p) in want)
    head_plan = plan_stage(net, Stage("h", 1, "head"), cfg)
    assert head_plan.grad_from == "head" and "body" in head_plan.eval_modules


def test_frozen_bottom_runs_without_autograd():
    net = tiny_net()
    plan = plan_stage(net, Stage("s", 1, 1), tiny_config())
    apply_plan(net, plan)
    set_train_mode(net, plan)
    seen = {}

    def record(module, args, out):
        seen.update(stem=out.requires_grad, grad=torch.is_grad_enabled())

    net.body.conv_stem.register_forward_hook(record)
    with grad_boundary(net, plan):
        out = net(torch.randn(2, 3, 32, 32))
    assert seen == {"stem": False, "grad": False}
    assert out.requires_grad and torch.is_grad_enabled()
    # every BN is held in eval mode (bn frozen) although the net is in train mode
    assert net.training and not any(
        m.training for m in net.body.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_lr_schedules():
    total, warm = 100, 10
    cos = [lr_factor("cosine", s, total, warm) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == 1.0 and cos[-1] < 1e-3
    assert all(a >= b for a, b in zip(cos[9:], cos[10:], strict=False))
    one = [lr_factor("onecycle", s, total, 0) for s in range(total)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one[-1] < 1e-3
    step = [lr_factor("step", s, total, 0) for s in range(total)]
    assert step[0] == 1 and step[40] == pytest.approx(0.1) and step[80] == pytest.approx(0.01)
    assert lr_factor("constant", 50, total, warm) == 1.0
    with pytest.raises(TransferlabError):
        lr_factor("linear", 1, total, 0)


def test_early_stopping_and_max_time(data, tmp_path):
    tr, va = data
    res = train(
        tiny_net(),
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(patience=2),
        out=tmp_path / "es",
        stages=[Stage("h", 6, "head", lr=1e-9)],
        augment="none",
        monitor="val_acc",
    )
    assert (res.epochs, res.best_epoch, res.stop_reason) == (3, 1, "early_stop")
    res = train(  # a grace period: early stopping never stops the run before min_epochs
        tiny_net(),
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(patience=2),
        out=tmp_path / "grace",
        stages=[Stage("h", 6, "head", lr=1e-9)],
        augment="none",
        monitor="val_acc",
        min_epochs=5,
    )
    assert (res.epochs, res.best_epoch, res.stop_reason) == (5, 1, "early_stop")
    res = train(
        tiny_net(),
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(max_time=0.0),
        out=tmp_path / "mt",
        stages=[Stage("h", 3, "head")],
        augment="none",
    )
    assert (res.epochs, res.stop_reason) == (0, "max_time")


# --------------------------------------------------------------------------------------------
# checkpoints and resume


def _two_stage_run(tr, va, out, **cfg):
    return train(
        tiny_net(3),
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(**cfg),
        out=out,
        stages=[
            Stage("head", 1, "head", lr=1e-2),
            Stage("top2", 3, 2, lr=1e-2, lr_mult=0.1, bn="train"),
        ],
        augment="light",
    )


def test_checkpoint_corruption_is_reported_never_half_loaded(data, tmp_path):
    tr, va = data
    _two_stage_run(tr, va, tmp_path, schedule="constant")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TransferlabError, match="last.ckpt.*corrupt or truncated"):
        load_checkpoint(last)
    net = tiny_net(9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TransferlabError, match="last.ckpt"):
        train(
            net,
            tr,
            va,
            preprocess=PRE,
            config=tiny_config(resume=True),
            out=tmp_path,
            stages=[Stage("head", 1, "head")],
            augment="none",
        )
    assert state_equal(before, net.state_dict())
    # a flipped byte inside the weights fails the checksum (or the zip CRC)
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(TransferlabError, match="best.ckpt"):
        load_checkpoint(ckpt)


def test_resume_restores_stage_and_matches_uninterrupted(data, tmp_path, monkeypatch):
    tr, va = data
    full = _two_stage_run(tr, va, tmp_path / "full")

    calls = {"n": 0}
    from transferlab.engine.loop import Trainer

    original = Trainer._log

    def interrupt_after_two(self, row, stage):
        original(self, row, stage)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed right after epoch 2's checkpoint

    monkeypatch.setattr(Trainer, "_log", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        _two_stage_run(tr, va, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_log", original)

    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    st = ckpt["state"]
    assert (st["stage_index"], st["stage_epoch"], st["epoch"]) == (1, 1, 2)
    assert st["stage_step"] == 3 and st["global_step"] == 6
    plan = StagePlan.from_dict(ckpt["plan"])
    net = tiny_net()
    named = dict(net.named_parameters())
    top2 = {id(p) for _, m in engine.body_stages(net.body)[-2:] for p in m.parameters()}
    assert {n for n in plan.trainable if not n.startswith("head.")} == {
        n for n, p in named.items() if id(p) in top2
    }
    opt = build_optimizer(net, plan, tiny_config())
    opt.load_state_dict(ckpt["optimizer"])
    assert {g["name"]: g["base_lr"] for g in opt.param_groups}["body"] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor("cosine", 2, 9, 0))

    resumed = _two_stage_run(tr, va, tmp_path / "cut", resume=True)
    strip = [
        {k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in full.history
    ]
    again = [
        {k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in resumed.history
    ]
    assert again == strip
    assert state_equal(resumed.net.state_dict(), full.net.state_dict())
    assert resumed.best_epoch == full.best_epoch


def _one_epoch(tr, va, out, net=None, **cfg):
    return train(
        net or tiny_net(3),
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(**cfg),
        out=out,
        stages=[Stage("head", 1, "head", lr=1e-2)],
        augment="light",
    )


def test_resume_refuses_changed_options_and_data(data, tmp_path):
    tr, va = data
    _one_epoch(tr, va, tmp_path)
    net = tiny_net(9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tail = ": resume with the same options, or start a new --out"
    with pytest.raises(TransferlabError, match="--optimizer was adamw, now sgd" + tail):
        _one_epoch(tr, va, tmp_path, net=net, resume=True, optimizer="sgd")
    assert state_equal(before, net.state_dict())  # refused before anything was loaded
    with pytest.raises(TransferlabError) as err:
        _one_epoch(tr, va, tmp_path, resume=True, batch_size=4, seed=1, schedule="constant")
    msg = str(err.value)
    assert "last.ckpt" in msg and msg.endswith(tail[2:])
    for change in ("--seed was 0, now 1", "--batch-size was 8, now 4", "--schedule was cosine"):
        assert change in msg
    with pytest.raises(TransferlabError, match="--augment was unset, now strong"):
        _one_epoch(tr, va, tmp_path, resume=True, augment="strong")
    other = make_split(tmp_path / "other", "train", 24, seed=7)  # same names, other pixels
    with pytest.raises(TransferlabError, match=r"the training images differ \(24 then, 24 now"):
        _one_epoch(other, va, tmp_path, resume=True)
    with pytest.raises(TransferlabError, match=r"the validation images differ \(11 then, 5 now"):
        _one_epoch(tr, make_split(tmp_path / "v", "val", 5), tmp_path, resume=True)
    with pytest.raises(TransferlabError, match="the strategy's monitor was val_loss, now val_acc"):
        train(
            tiny_net(3),
            tr,
            va,
            preprocess=PRE,
            config=tiny_config(resume=True),
            out=tmp_path,
            stages=[Stage("head", 1, "head", lr=1e-2)],
            augment="light",
            monitor="val_acc",
        )
    # where and how fast it runs may change: workers, time budget, runtime, cache
    res = _one_epoch(
        tr, va, tmp_path, resume=True, workers=1, max_time=1e6, engine="torch", cache_dir="x"
    )
    assert res.epochs == 1 and res.stop_reason == "completed"


def test_resume_refuses_other_stages(data, tmp_path):
    tr, va = data
    _two_stage_run(tr, va, tmp_path)
    with pytest.raises(TransferlabError, match="written for other stages"):
        train(
            tiny_net(),
            tr,
            va,
            preprocess=PRE,
            config=tiny_config(resume=True),
            out=tmp_path,
            stages=[Stage("other", 1, "all")],
            augment="light",
        )


# --------------------------------------------------------------------------------------------
# reproducibility: augmentation draws per item, whatever the number of DataLoader workers


def test_augmented_items_depend_only_on_seed_epoch_and_index(data):
    from torch.utils.data import DataLoader

    from transferlab.data.dataset import ImageDataset, collate

    tr, _ = data
    n = 6
    ds = ImageDataset(
        tr.paths[:n], tr.labels[:n], build_transform("strong", PRE, train=True), seed=5
    )

    def two_epochs(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(
            ds,
            batch_size=4,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=workers > 0,
        )
        views = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            views.append(torch.cat([x for x, _ in loader]))
        return views

    ds.set_epoch(1)
    rng = torch.get_rng_state()
    items = torch.stack([ds[i][0] for i in range(n)])
    assert torch.equal(rng, torch.get_rng_state())  # private streams: global RNG untouched
    direct = two_epochs(0)
    assert torch.equal(direct[1], items)
    assert not torch.equal(direct[0], direct[1])  # the epoch is part of every item's draw
    persistent = two_epochs(2)  # workers made once, told the epoch through shared memory
    assert all(torch.equal(a, b) for a, b in zip(direct, persistent, strict=True))
    torch.manual_seed(123)  # whatever the global state, whatever came before: same item
    ds.set_epoch(1)
    assert torch.equal(ds[3][0], direct[1][3]) and ds.epoch == 1
    other = ImageDataset(ds.paths, ds.labels, ds.transform, seed=6)
    assert not torch.equal(other[3][0], ds[3][0])  # the run seed too


def test_training_is_identical_with_any_number_of_workers(data, tmp_path):
    tr, va = data
    runs = [
        train(
            tiny_net(4),
            tr,
            va,
            preprocess=PRE,
            config=tiny_config(workers=workers),
            out=tmp_path / f"w{workers}",
            stages=[Stage("all", 1, "all", lr=1e-2, bn="train")],
            augment="strong",
        )
        for workers in (0, 2)
    ]
    assert state_equal(runs[0].net.state_dict(), runs[1].net.state_dict())
    strip = [
        {k: v for k, v in r.history[0].items() if k not in ("seconds", "img_per_s")} for r in runs
    ]
    assert strip[0] == strip[1]


# --------------------------------------------------------------------------------------------
# class weights


def test_class_weights_are_one_balanced_rule_for_engine_and_heads(data, tmp_path):
    from transferlab.heads import fit_head

    y = np.array([0, 0, 0, 1, 2, 2])
    w = class_weights(y, 3, "auto")
    np.testing.assert_allclose(w, [6 / 9, 6 / 3, 6 / 6], rtol=1e-12)
    np.testing.assert_array_equal(class_weights(y, 3, "balanced"), w)
    assert class_weights(y, 3, None) is None
    assert class_weights(y, 3, "none") is None
    loss = cross_entropy(y, 3, tiny_config(class_weight="auto"))  # the engine's loss
    np.testing.assert_allclose(loss.weight.numpy(), w, rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    head = fit_head("linear", x, y, None, None, num_classes=3, class_weight="auto")
    np.testing.assert_allclose(head.spec["class_weights"], w, rtol=1e-12)
    # the head has 3 classes, the training labels only 0 and 1: sized by the classes, the
    # weight of class 2 is undefined (it used to be sized by the largest label: a torch crash)
    tr, va = data
    with pytest.raises(TransferlabError, match=r"class\(es\) \[2\] have no training images"):
        train(
            tiny_net(num_classes=3),
            tr,
            va,
            preprocess=PRE,
            config=tiny_config(class_weight="auto"),
            out=tmp_path,
            stages=[Stage("h", 1, "head")],
            augment="none",
        )


# --------------------------------------------------------------------------------------------
# BatchNorm placeholders


def test_bn_recalibration_keeps_eval_output():
    net = tiny_net()
    assert not has_placeholder_bn(net.body)  # a fresh init is not "folded constants"
    fold_bn(net.body)
    assert has_placeholder_bn(net.body)
    x = torch.randn(16, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        y0 = net(x)
        seen = recalibrate_bn(net.body, [x[:8], x[8:]])
        y1 = net(x)
    assert seen == 16 and not net.training
    assert (y1 - y0).abs().max().item() < 1e-4
    assert not has_placeholder_bn(net.body)
    bn = net.body.bn1
    assert bn.running_var.min() > 0 and not torch.all(bn.running_mean == 0)


def test_bn_train_on_placeholders_recalibrates_first(data, tmp_path):
    tr, va = data
    net = tiny_net()
    fold_bn(net.body)
    res = train(
        net,
        tr,
        va,
        preprocess=PRE,
        config=tiny_config(),
        out=tmp_path,
        stages=[Stage("ft", 1, "all", lr=1e-3, bn="train")],
        augment="none",
    )
    assert res.recalibrated_bn and not has_placeholder_bn(net.body)


# --------------------------------------------------------------------------------------------
# strategies end to end (tiny backbone stands in for the pretrained one)


def _context(tmp_path: Path, data, **cfg) -> StrategyContext:
    tr, va = data
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0).eval()
    fold_bn(model)  # behave like the shared weights: BN must stay frozen
    backbone = Backbone(
        spec=ARCH,
        model=model,
        preprocess=PRE,
        num_features=model.num_features,
        weights_hash="0" * 64,
        pretrained=True,
    )
    config = tiny_config(engine="torch", cache_dir=str(tmp_path / "cache"), **cfg)
    ctx = StrategyContext(["a", "b"], tr, va, va, config, tmp_path / "run", backbone=backbone)
    ctx.extractor = feature_extractor(backbone, config)
    return ctx


def test_finetune_strategy_two_phases(data, tmp_path):
    ctx = _context(tmp_path, data, epochs=2, unfreeze="2", gradual=True, strategy="finetune")
    shared_before = {k: v.clone() for k, v in ctx.backbone.model.state_dict().items()}
    result = STRATEGIES["finetune"].run(ctx)
    assert [s["name"] for s in result.info["stages"]] == ["unfreeze-1", "unfreeze-2"]
    assert result.body["trained"] and result.info["epochs"] == 2
    assert result.body["recipe"]["architecture"] == ARCH
    assert state_equal(shared_before, ctx.backbone.model.state_dict())  # the ladder's copy
    saved = SavedModel(
        result.net, ["a", "b"], result.preprocess, result.body, result.head, "finetune"
    )
    loaded = SavedModel.load(saved.save(tmp_path / "model"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), result.net(x), atol=1e-6)
    assert (tmp_path / "run" / "history.csv").is_file()


def test_frozen_strategy_caches_augmented_views(data, tmp_path):
    from transferlab.strategies import frozen

    ctx = _context(tmp_path, data, epochs=5, augment="tutorial", strategy="frozen")
    result = frozen.run(ctx)
    views = result.info["views"]
    assert views["views"] == frozen.VIEWS and views["computed"] == frozen.VIEWS * 24
    assert result.probs["val"].shape == (11, 2) and not result.body["trained"]
    assert len(result.history) == 5
    again = frozen.run(_context(tmp_path, data, epochs=5, augment="tutorial", strategy="frozen"))
    assert again.info["views"]["computed"] == 0  # all K views come from the cache
    np.testing.assert_allclose(again.probs["val"], result.probs["val"], atol=1e-6)
    first, _ = frozen.augmented_features(ctx, ctx.train, "tutorial", views=2)
    assert not np.allclose(first[0], first[1])  # the views really differ


def test_scratch_strategy_result_round_trips(data, tmp_path):
    ctx = _context(tmp_path, data, epochs=1, image_size=64, strategy="scratch-basic")
    result = STRATEGIES["scratch-basic"].run(ctx)
    assert result.body["recipe"] == {"kind": "scratch", "name": "basic", "input_size": [64, 64]}
    assert result.preprocess.input_size == (64, 64) and result.info["augment"] == "none"
    saved = SavedModel(result.net, ["a", "b"], result.preprocess, result.body, result.head, "s")
    loaded = SavedModel.load(saved.save(tmp_path / "m"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), result.net(x), atol=1e-6)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["body"]["trained"] is True


def test_scratch_cnn_defaults(data, tmp_path):
    from transferlab.strategies import scratch

    ctx = _context(tmp_path, data, image_size=64, strategy="scratch-regularized")
    setup = scratch.prepare_regularized(ctx)
    assert setup.monitor == "val_acc" and setup.min_epochs == scratch.MIN_EPOCHS >= 5
    (stage,) = setup.stages
    assert (stage.lr, stage.epochs) == (scratch.CNN_LR, scratch.DEFAULT_EPOCHS) == (1e-4, 30)
    layers = [m for m in setup.net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(layers) == 4 + 2 + 1  # the tutorial's architecture, untouched
    for m in layers:  # Keras' glorot_uniform kernels and zero biases
        w = m.weight.detach()
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert 0.9 * bound < float(w.abs().max()) <= bound
        assert not m.bias.any()
    again = scratch.prepare_regularized(ctx)
    assert state_equal(again.net.state_dict(), setup.net.state_dict())  # seeded init
    ctx.config.lr, ctx.config.epochs = 0.5, 3  # given options win
    (stage,) = scratch.prepare_basic(ctx).stages
    assert (stage.lr, stage.epochs) == (0.5, 3)


def test_lr_find_restores_state_and_suggests(data, tmp_path):
    from transferlab.lr_find import lr_find

    tr, _ = data
    net = tiny_net()
    plan = plan_stage(net, Stage("s", 1, 1), tiny_config())
    apply_plan(net, plan)
    set_train_mode(net, plan)
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    modes = {n: m.training for n, m in net.named_modules()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    out = lr_find(
        net,
        tr,
        preprocess=PRE,
        config=tiny_config(),
        out_png=tmp_path / "lr.png",
        num_it=12,
        stage=Stage("all", 1, "all", bn="train"),
    )
    assert state_equal(state, net.state_dict())  # weights and BN statistics
    assert grads == {n: p.requires_grad for n, p in net.named_parameters()}
    assert modes == {n: m.training for n, m in net.named_modules()}
    assert torch.equal(rng, torch.get_rng_state())
    assert set(out["suggestions"]) == {"valley", "steep", "minimum"}
    assert len(out["lrs"]) == len(out["losses"]) <= 12 and (tmp_path / "lr.png").stat().st_size
    assert all(v is None or 1e-7 <= v <= 10 for v in out["suggestions"].values())


def test_devnull_out_leaves_no_files(data, tmp_path, monkeypatch):
    tr, va = data
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    res = train(
        tiny_net(),
        tr,
        None,
        preprocess=PRE,
        config=tiny_config(),
        out=Path(os.devnull),
        stages=[Stage("h", 1, "head")],
        augment="none",
    )
    assert res.best_epoch == 1 and res.history[0]["val_acc"] is None
    assert list(tmp_path.iterdir()) == []


def test_lr_find_strategy_sweeps_the_phase_two_network(data, tmp_path):
    from transferlab.lr_find import lr_find_strategy

    ctx = _context(tmp_path, data, strategy="finetune", unfreeze="1")
    out = lr_find_strategy(ctx, None, num_it=4)
    assert len(out["lrs"]) <= 4 and "plot" not in out
    ctx.config.strategy = "features"
    with pytest.raises(TransferlabError, match="no learning rate to find"):
        lr_find_strategy(ctx, None)
    assert engine.is_global_zero()
