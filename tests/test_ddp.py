"""Real DDP: two CPU processes (gloo) spawned by Lightning Fabric's ``ddp_spawn`` strategy.

Checks that the run trains, that the reported validation metrics are exact over the whole
(odd-sized, unevenly sharded) validation set, and that the returned model and the best
checkpoint are the same, loadable weights.
"""

from __future__ import annotations

import pytest
import torch

from test_engine import PRE, evaluate, make_split, state_equal, tiny_config, tiny_net
from transferlab.engine import Stage, load_checkpoint, train
from transferlab.runs import SavedModel
from transferlab.storage import state_digest


@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_QUIET", "1")
    tr = make_split(tmp_path / "data", "train", 16)
    va = make_split(tmp_path / "data", "val", 9, seed=100)
    net = tiny_net(5)
    cfg = tiny_config(accelerator="cpu", devices=2, dist_strategy="ddp_spawn")
    res = train(
        net,
        tr,
        va,
        preprocess=PRE,
        config=cfg,
        out=tmp_path / "run",
        stages=[Stage("head", 1, "head", lr=1e-2), Stage("top2", 2, 2, lr=1e-2, lr_mult=0.1)],
        augment="light",
    )
    assert res.net is net and res.epochs == 3 and len(res.history) == 3
    best = res.history[res.best_epoch - 1]
    loss, acc = evaluate(net, va)  # single process, the whole validation set
    assert acc == pytest.approx(best["val_acc"]) and loss == pytest.approx(best["val_loss"], 1e-5)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert state_equal(ckpt["model"], net.state_dict())
    recipe = {"kind": "timm", "architecture": "test_efficientnet"}
    head = {"kind": "linear", "in_features": net.body.num_features, "num_classes": 2}
    body = {"spec": "test_efficientnet", "recipe": recipe, "weights_hash": state_digest(net.body)}
    saved = SavedModel(net, ["a", "b"], PRE, body, head, "finetune")
    loaded = SavedModel.load(saved.save(tmp_path / "model"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), net(x), atol=1e-6)
