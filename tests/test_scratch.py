"""The tutorial CNN bodies: layer structure, feature sizes at 150x150, recipes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.model import build_body
from transferlab.scratch import build_scratch_body, scratch_recipe


def _layers(body: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in body.named_children()]


def test_basic_is_the_tutorial_cnn():
    body = build_scratch_body(scratch_recipe("basic", 150))
    assert _layers(body) == [
        ("conv1", "Conv2d"), ("relu1", "ReLU"), ("pool1", "MaxPool2d"),
        ("conv2", "Conv2d"), ("relu2", "ReLU"), ("pool2", "MaxPool2d"),
        ("conv3", "Conv2d"), ("relu3", "ReLU"), ("pool3", "MaxPool2d"),
        ("flatten", "Flatten"), ("fc1", "Linear"), ("fc1_relu", "ReLU"),
    ]  # fmt: skip
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size) for m in body if isinstance(m, nn.Conv2d)
    ]
    assert convs == [(3, 16, (3, 3)), (16, 64, (3, 3)), (64, 128, (3, 3))]
    # Keras 'valid' convs + floor pooling: 150 -> 148 -> 74 -> 72 -> 36 -> 34 -> 17
    assert body.fc1.in_features == 128 * 17 * 17 and body.fc1.out_features == 512
    assert body.num_features == 512


def test_regularized_adds_a_block_and_dropout():
    body = build_scratch_body(scratch_recipe("regularized", 150))
    names = [n for n, _ in _layers(body)]
    blocks = [f"{kind}{i}" for i in range(1, 5) for kind in ("conv", "relu", "pool")]
    assert names == [*blocks, "flatten", "fc1", "fc1_relu", "drop1", "fc2", "fc2_relu", "drop2"]
    convs = [m.out_channels for m in body if isinstance(m, nn.Conv2d)]
    assert convs == [16, 64, 128, 128]
    assert body.fc1.in_features == 128 * 7 * 7  # ... -> 17 -> 15 -> 7
    assert body.drop1.p == 0.3 and body.drop2.p == 0.3
    assert body.fc2.in_features == body.fc2.out_features == 512


@pytest.mark.parametrize("name", ["basic", "regularized"])
def test_feature_vector_at_150(name):
    body = build_body(scratch_recipe(name, 150)).eval()  # the path SavedModel.load takes
    with torch.no_grad():
        out = body(torch.randn(2, 3, 150, 150))
    assert out.shape == (2, 512) and bool((out >= 0).all())  # the last hidden ReLU vector


def test_bad_recipes_are_user_errors():
    with pytest.raises(TransferlabError, match="unknown scratch model"):
        build_scratch_body({"kind": "scratch", "name": "vgg", "input_size": [150, 150]})
    with pytest.raises(TransferlabError, match="input_size"):
        build_scratch_body({"kind": "scratch", "name": "basic"})
    with pytest.raises(TransferlabError, match="too small"):
        build_scratch_body(scratch_recipe("regularized", 24))
