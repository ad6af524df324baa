"""Fine-tuning that never ends below its phase-1 head on val: the engine's stage baseline (the
starting weights compete as epoch 0, guarded by their val accuracy) and the finetune strategy's
use of it. Tiny random ``test_efficientnet`` at 32 px on colour JPEGs (helpers of test_engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_engine import PRE, _context, evaluate, make_split, state_equal, tiny_config, tiny_net
from transferlab.engine import Stage, train
from transferlab.errors import TransferlabError
from transferlab.strategies import STRATEGIES
from transferlab.strategies.finetune import phase1_baseline


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_QUIET", "1")
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-data")
    return make_split(root, "train", 16), make_split(root, "val", 9, seed=100)


def _train(data, tmp_path, name: str, baseline: dict | None, resume: bool = False):
    tr, va = data
    net = tiny_net(seed=3)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    stage = Stage("finetune", 3, "all", lr=3e-3, baseline=baseline)
    config = tiny_config(resume=resume)
    res = train(
        net, tr, va, preprocess=PRE, config=config, out=tmp_path / name, stages=[stage],
        augment="none",
    )  # fmt: skip
    return res, start


def test_phase1_baseline_is_log_loss_and_accuracy():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0], [0.3, 0.7], [0.1, 0.9]])
    labels = np.array([0, 1, 1, 0, 1, 1])
    got = phase1_baseline(probs, labels)
    # p(true) = 0.9, 0.8, 0.4, 0 (clipped to 1e-15 as sklearn's log_loss does), 0.7, 0.9
    loss = -np.log([0.9, 0.8, 0.4, 1e-15, 0.7, 0.9]).mean()
    assert got == {"val_loss": round(loss, 6), "val_acc": 4 / 6}  # 4/6 exactly: a count ratio
    assert phase1_baseline(None, labels) is None
    assert phase1_baseline(probs[:0], labels[:0]) is None


def test_unbeaten_baseline_keeps_the_starting_weights(data, tmp_path):
    free, _ = _train(data, tmp_path, "free", None)
    assert free.best_epoch >= 1  # without a baseline some epoch is always the result
    accs = [row["val_acc"] for row in free.history]
    losses = [row["val_loss"] for row in free.history]
    # every epoch beats this on loss, none reaches its accuracy: the start stays the result
    high_floor = {"val_loss": max(losses) + 1.0, "val_acc": max(accs) + 1e-3}
    kept, start = _train(data, tmp_path, "kept", high_floor)
    assert kept.best_epoch == 0 and kept.epochs == 3
    assert state_equal(start, kept.net.state_dict())
    # a loss no epoch reaches: the start stays the result too
    _, va = data
    low_loss = {"val_loss": 0.0, "val_acc": 0.0}
    kept2, _ = _train(data, tmp_path, "kept2", low_loss)
    assert kept2.best_epoch == 0 and state_equal(start, kept2.net.state_dict())
    # a baseline every epoch beats changes nothing: same best epoch, same weights
    beaten = {"val_loss": max(losses) + 1.0, "val_acc": 0.0}
    same, _ = _train(data, tmp_path, "same", beaten)
    assert same.best_epoch == free.best_epoch
    assert state_equal(free.net.state_dict(), same.net.state_dict())
    assert evaluate(same.net, va)[0] == pytest.approx(losses[free.best_epoch - 1], abs=1e-4)


def test_bad_baseline_is_refused():
    with pytest.raises(TransferlabError, match="baseline"):
        Stage("s", 1, baseline={"val_loss": float("nan"), "val_acc": 1.0}).check()
    with pytest.raises(TransferlabError, match="baseline"):
        Stage("s", 1, baseline={"val_loss": 0.1}).check()


def test_finetune_hands_phase1_val_to_the_engine(data, tmp_path):
    ctx = _context(tmp_path, data, epochs=1, unfreeze="1", strategy="finetune")
    result = STRATEGIES["finetune"].run(ctx)
    baseline = result.info["phase1_val"]
    assert baseline == result.info["stages"][0]["baseline"]
    assert 0.0 <= baseline["val_acc"] <= 1.0 and baseline["val_loss"] > 0
    # phase 1 kept or a better epoch: either way never below phase 1 on val
    assert evaluate(result.net, ctx.val)[1] >= baseline["val_acc"] - 1e-9


def test_resumed_run_keeps_the_baseline(data, tmp_path, monkeypatch):
    from transferlab.engine.loop import Trainer

    free, _ = _train(data, tmp_path, "free", None)
    high_floor = {"val_loss": 1e3, "val_acc": max(r["val_acc"] for r in free.history) + 1e-3}
    original = Trainer._log

    def killed_after_first_epoch(self, row, stage):
        original(self, row, stage)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_log", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path, "cut", high_floor)
    monkeypatch.setattr(Trainer, "_log", original)
    # the floor and the starting weights (last.ckpt's best_model) survive the interruption
    resumed, start = _train(data, tmp_path, "cut", high_floor, resume=True)
    assert resumed.epochs == 3 and resumed.best_epoch == 0
    assert state_equal(start, resumed.net.state_dict())
