"""The contract every entry of ``STRATEGIES`` keeps, checked on each of them with a tiny random
backbone: fit → save → load gives identical probabilities, the metrics carry their keys, and the
run's history is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import transferlab
from transferlab.data.prepared import Split
from transferlab.strategies import STRATEGIES

TINY = "mobilenetv2_035"  # random init: no network, ~0.4 M parameters
METRIC_KEYS = {"n", "accuracy", "accuracy_ci95", "balanced_accuracy", "log_loss", "ece"}


def test_gradient_trained_strategies_say_how_lr_find_prepares_them():
    for name, spec in STRATEGIES.items():
        # a strategy trained by gradient descent says how lr-find sets up its network
        assert (spec.prepare is None) == (name in ("features", "frozen")), name


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_contract(strategy, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    clf = transferlab.fit(
        tiny_dataset,
        out=out,
        strategy=strategy,
        backbone=TINY,
        pretrained=False,
        engine="torch",
        cache_dir=str(tmp_path / "cache"),
        workers=0,
        epochs=1,
        image_size=64,
        batch_size=8,
    )
    for split in ("val", "test"):
        assert set(clf.metrics[split]) >= METRIC_KEYS, (strategy, split)
    assert clf.metrics["strategy"] == strategy
    assert clf.history, f"{strategy}: no history"
    assert json.loads((out / "history.json").read_text()) == json.loads(json.dumps(clf.history))
    meta = json.loads((out / "model.json").read_text())
    assert meta["strategy"] == strategy and meta["body"]["recipe"]

    loaded = transferlab.load(out)
    test = tiny_dataset / "test"
    paths = sorted(str(p) for p in test.rglob("*.jpg"))
    split = Split(
        paths=paths, labels=np.zeros(len(paths), dtype=np.int64), digests=[""] * len(paths)
    )
    # the in-memory model and the one read back from disk give the same probabilities
    np.testing.assert_allclose(
        loaded.predict_proba_split(_digested(split)),
        clf.predict_proba_split(_digested(split)),
        atol=1e-6,
    )


def _digested(split: Split) -> Split:
    from transferlab.data.images import file_digest

    return Split(split.paths, split.labels, [file_digest(p) for p in split.paths])


def test_options_a_strategy_ignores_are_named():
    from transferlab.config import FitConfig
    from transferlab.strategies import ignored_options

    assert ignored_options(FitConfig(epochs=10, augment="strong")) == ["augment", "epochs"]
    assert ignored_options(FitConfig(strategy="finetune", epochs=10, unfreeze="all")) == []
    assert ignored_options(FitConfig(strategy="scratch-basic", head="mlp")) == ["head"]
    assert ignored_options(FitConfig(strategy="frozen", bn="train")) == ["bn"]
    # every name it can report is an option of the config
    names = set(FitConfig().to_dict())
    assert all(spec.ignores <= names for spec in STRATEGIES.values())
