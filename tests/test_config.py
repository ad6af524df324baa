"""FitConfig.validate: every bad option is a TransferlabError naming the option (and what it takes),
before any data is read; good values pass; importing the config stays light."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from transferlab.config import FitConfig
from transferlab.errors import TransferlabError

BAD = [
    # (field, value, the option the message must name, something the message must list)
    ("strategy", "scratch", "--strategy", "finetune"),
    ("head", "svm", "--head", "mlp"),
    ("class_weight", "balanced-ish", "--class-weight", "auto"),
    ("batch_size", 0, "--batch-size", ">= 1"),
    ("seed", -1, "--seed", ">= 0"),
    ("seed", 1.5, "--seed", ">= 0"),
    ("workers", -1, "--workers", ">= 0"),
    ("max_pixels", 0, "--max-pixels", ">= 1"),
    ("engine", "tensorrt", "--engine", "openvino"),
    ("epochs", 0, "--epochs", ">= 1"),
    ("epochs", -3, "--epochs", ">= 1"),
    ("epochs", 2.5, "--epochs", ">= 1"),
    ("lr", 0.0, "--lr", "> 0"),
    ("lr", -1e-3, "--lr", "> 0"),
    ("lr", math.nan, "--lr", "> 0"),
    ("lr", math.inf, "--lr", "> 0"),
    ("optimizer", "adam", "--optimizer", "adamw, sgd, rmsprop"),
    ("schedule", "linear", "--schedule", "cosine, onecycle, step, constant"),
    ("warmup_epochs", -1.0, "--warmup-epochs", ">= 0"),
    ("weight_decay", -0.1, "--weight-decay", ">= 0"),
    ("weight_decay", math.nan, "--weight-decay", ">= 0"),
    ("label_smoothing", 1.0, "--label-smoothing", r"\[0, 1\)"),
    ("label_smoothing", -0.1, "--label-smoothing", r"\[0, 1\)"),
    ("patience", 0, "--patience", ">= 1"),
    ("max_time", -5.0, "--max-time", ">= 0"),
    ("augment", "heavy", "--augment", "tutorial"),
    ("augment", "", "--augment", "light"),
    ("unfreeze", "0", "--unfreeze", "'all'"),
    ("unfreeze", "top", "--unfreeze", "'all'"),
    ("unfreeze", -2, "--unfreeze", "'all'"),
    ("lr_mult", 0.0, "--lr-mult", "> 0"),
    ("bn", "eval", "--bn", "frozen, train"),
    ("image_size", 8, "--image-size", ">= 16"),
    ("image_size", 0, "--image-size", ">= 16"),
    ("devices", 0, "--devices", "auto"),
    ("devices", "two", "--devices", "auto"),
    ("devices", "-2", "--devices", "auto"),
    ("precision", "fp16", "--precision", "bf16-mixed"),
    ("precision", "32", "--precision", "32-true"),
]


@pytest.mark.parametrize(("field", "value", "option", "valid"), BAD)
def test_bad_value_names_the_option(field, value, option, valid):
    with pytest.raises(TransferlabError, match=option) as err:
        FitConfig(**{field: value}).validate()
    assert str(err.value).startswith(option)
    assert re.search(valid, str(err.value)), str(err.value)  # what the option takes


GOOD = [
    ("epochs", None),
    ("epochs", 1),
    ("lr", None),
    ("lr", 3e-4),
    ("optimizer", "rmsprop"),
    ("schedule", "onecycle"),
    ("augment", None),
    ("augment", "none"),
    ("augment", "strong"),
    ("bn", "train"),
    ("unfreeze", "all"),
    ("unfreeze", "3"),
    ("unfreeze", 1),
    ("engine", "onnxruntime"),
    ("precision", "bf16-mixed"),
    ("precision", "64-true"),
    ("devices", 2),
    ("devices", -1),
    ("devices", "auto"),
    ("devices", "-1"),
    ("devices", "0,1"),
    ("devices", "1,"),
    ("patience", None),
    ("patience", 1),
    ("label_smoothing", 0.1),
    ("image_size", 16),
    ("image_size", None),
    ("warmup_epochs", 0.5),
    ("weight_decay", 0),
    ("max_time", 0.0),
    ("seed", 0),
    ("workers", 0),
]


@pytest.mark.parametrize(("field", "value"), GOOD)
def test_good_values_pass(field, value):
    cfg = FitConfig(**{field: value})
    assert cfg.validate() is cfg


def test_defaults_are_valid_and_class_weight_none_is_normalized():
    assert FitConfig().validate() == FitConfig()
    assert FitConfig(class_weight="none").validate().class_weight is None
    assert FitConfig(class_weight="auto").validate().class_weight == "auto"


def test_engine_and_config_share_the_vocabularies():
    from transferlab import augment, config, engine, runtime

    assert engine.OPTIMIZERS is config.OPTIMIZERS
    assert engine.SCHEDULES is config.SCHEDULES
    assert engine.BN_POLICIES is config.BN_POLICIES
    assert tuple(runtime.ENGINES) == config.ENGINES
    assert FitConfig(augment=augment.PRESETS[-1]).validate()
    # the registries that implement the names config validates against are keyed by them
    from transferlab import heads
    from transferlab.strategies import STRATEGIES

    assert tuple(augment.PRESETS) == config.AUGMENT_PRESETS
    assert tuple(heads.HEADS) == config.HEAD_NAMES
    assert tuple(STRATEGIES) == config.STRATEGY_NAMES


def test_importing_the_config_stays_light():
    code = (
        "import sys, transferlab.config; "
        "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'lightning', 'timm') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
