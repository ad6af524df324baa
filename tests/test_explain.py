"""Explainability: target-layer choice, Grad-CAM, feature maps, filters, convolution demo.

Tiny random timm models at 64 px and synthetic images only: no shared data, a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain import (
    EXPLANATION_DPI,
    EXPLANATION_FIGSIZE,
    KERNELS,
    bottleneck_vector,
    convolve,
    default_feature_stages,
    display_response,
    feature_maps,
    find_target_layer,
    first_layer_filters,
    grad_cam,
    normalize,
    overlay_cam,
    parse_kernel,
    plot_bottleneck,
    plot_convolution,
    plot_feature_maps,
    plot_filters,
    save_explanations,
    to_grayscale,
)
from transferlab.model import ClassifierNet

SIZE = 64
MEAN = STD = (0.5, 0.5, 0.5)


def _timm(name: str, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def mnv2() -> nn.Module:
    return _timm("mobilenetv2_100")


@pytest.fixture(scope="module")
def images_u8() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(3, 3, SIZE, SIZE), dtype=np.uint8)


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).eval()


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes the whole file: catches truncated writes
        return im.size


# ----------------------------------------------------------------------------- inputs


def test_normalize_matches_formula_and_validates() -> None:
    img = np.array([0, 128, 255], dtype=np.uint8).reshape(3, 1, 1).repeat(2, 1).repeat(2, 2)
    x = normalize(img, MEAN, STD)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    assert normalize([img, img], MEAN, STD).shape == (2, 3, 2, 2)
    with pytest.raises(TransferlabError, match="uint8"):
        normalize(img.astype(np.float32), MEAN, STD)
    with pytest.raises(TransferlabError, match="channel-first"):
        normalize(img.transpose(1, 2, 0)[None], MEAN, STD)


# ------------------------------------------------------------------- target layer


@pytest.mark.parametrize(
    ("arch", "last", "stride16"),
    [
        ("mobilenetv2_100", "bn2", "blocks.4"),  # bn2: conv_head + BN + ReLU6, after blocks.6
        ("resnet18", "layer4", "layer3"),
        ("efficientnet_b0", "bn2", "blocks.4"),
        ("convnext_atto", "stages.3", "stages.2"),
    ],
)
def test_find_target_layer_timm(arch: str, last: str, stride16: str) -> None:
    model = _timm(arch)
    out = {}

    def output_of(module: nn.Module) -> torch.Tensor:
        out.clear()
        h = module.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
        with torch.no_grad():
            model(torch.zeros(1, 3, SIZE, SIZE))
        h.remove()
        return out["y"]

    name, module = find_target_layer(model, (SIZE, SIZE), max_stride=None)
    assert name == last
    assert module is model.get_submodule(last)
    # It is the map the classifier pools: channel count == the pooled feature width.
    y = output_of(module)
    assert y.ndim == 4 and y.shape[1] == model.num_features
    # The default: the deepest stage at stride 16, twice the last stage's resolution.
    name, module = find_target_layer(model, (SIZE, SIZE))
    assert name == stride16
    assert (
        output_of(module).shape[-2:]
        == (SIZE // 16, SIZE // 16)
        == tuple(2 * d for d in y.shape[-2:])
    )
    # max_stride=32 admits the last stage again.
    assert find_target_layer(model, (SIZE, SIZE), max_stride=32)[0] == last


@pytest.mark.parametrize(
    ("arch", "kwargs", "size", "message"),
    [
        ("vit_tiny_patch16_224", {"img_size": 64}, 64, "works on tokens"),
        ("swin_tiny_patch4_window7_224", {}, 224, "channels-last"),
    ],
)
def test_transformers_are_refused_not_mis_explained(arch, kwargs, size, message) -> None:
    """A ViT's only (n, C, h, w) map is its patch stem; Swin's stages are channels-last. A CAM
    of either would look plausible and mean nothing: refuse with a clear error."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=2, **kwargs).eval()
    with pytest.raises(TransferlabError, match=message):
        find_target_layer(model, (size, size))
    with pytest.raises(TransferlabError, match=message):
        grad_cam(model, torch.rand(1, 3, size, size))


def test_hybrid_conv_transformer_keeps_its_conv_stage() -> None:
    # MobileViT runs token blocks inside its later stages but its stage outputs are conv maps.
    model = _timm("mobilevit_xxs")
    name, _ = find_target_layer(model, (SIZE, SIZE))
    assert name == "stages.3"
    cams, _ = grad_cam(model, torch.rand(1, 3, SIZE, SIZE))
    assert cams.shape == (1, SIZE, SIZE)


def test_find_target_layer_sequential_and_wrapped_body() -> None:
    seq = _small_cnn()
    name, module = find_target_layer(seq, (32, 32))
    assert name == "6" and isinstance(module, nn.ReLU)  # last activation before the pool
    body = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    net = ClassifierNet(body, nn.Linear(body.num_features, 2)).eval()
    assert find_target_layer(net, (SIZE, SIZE), max_stride=None)[0] == "body.bn2"
    assert find_target_layer(net, (SIZE, SIZE))[0] == "body.blocks.4"
    assert _no_hooks(seq) and _no_hooks(net)


# ------------------------------------------------------------------------ grad-cam


def test_grad_cam_shape_range_and_classes(mnv2: nn.Module, images_u8: np.ndarray) -> None:
    x = normalize(images_u8, MEAN, STD)
    cams, classes = grad_cam(mnv2, x)
    assert cams.shape == (3, SIZE, SIZE) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    with torch.no_grad():
        np.testing.assert_array_equal(classes, mnv2(x).argmax(1).numpy())
    for cam in cams:  # min-max scaled per image, or all zero when no positive evidence
        assert cam.max() == pytest.approx(1.0) or cam.max() == 0.0
    _, fixed = grad_cam(mnv2, x, target_class=2)
    assert fixed.tolist() == [2, 2, 2]
    _, per = grad_cam(mnv2, x, target_class=[0, 1, 2])
    assert per.tolist() == [0, 1, 2]
    # Explicit layer (name or module) and method == automatic choice.
    by_name, _ = grad_cam(mnv2, x, target_layer="blocks.4", method="hirescam")
    by_module, _ = grad_cam(mnv2, x, target_layer=mnv2.blocks[4])
    np.testing.assert_allclose(by_name, cams, atol=1e-5)
    np.testing.assert_allclose(by_module, cams, atol=1e-5)
    early, _ = grad_cam(mnv2, x, target_layer="blocks.2")
    assert early.shape == cams.shape
    assert _no_hooks(mnv2)


def test_grad_cam_leaves_model_state_untouched() -> None:
    model = _small_cnn()
    model.train()
    model[3].eval()  # a deliberately frozen BatchNorm inside a training model
    for p in model[0].parameters():
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    running_mean = model[3].running_mean.clone()
    x = torch.randn(2, 3, 32, 32)
    grad_cam(model, x)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())  # no .grad created or accumulated
    assert torch.equal(model[3].running_mean, running_mean)  # ran in eval mode: BN untouched
    assert _no_hooks(model)


def test_grad_cam_frozen_model_and_inference_mode() -> None:
    model = _small_cnn()
    model.requires_grad_(False)  # typical frozen feature extractor
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)  # an inference tensor, as prediction code makes them
        cams, _ = grad_cam(model, x)
    assert cams.shape == (2, 32, 32) and cams.max() > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert _no_hooks(model)


def test_grad_cam_errors_remove_hooks(mnv2: nn.Module, images_u8: np.ndarray) -> None:
    x = normalize(images_u8, MEAN, STD)
    with pytest.raises(TransferlabError, match="out of range"):
        grad_cam(mnv2, x, target_class=7)
    assert _no_hooks(mnv2)
    with pytest.raises(TransferlabError, match="one per image"):
        grad_cam(mnv2, x, target_class=[0, 1])
    with pytest.raises(TransferlabError, match="not a submodule"):
        grad_cam(mnv2, x, target_layer="no.such.layer")
    with pytest.raises(TransferlabError, match="4-D"):
        grad_cam(mnv2, x, target_layer="global_pool.flatten")  # (n, C): not a feature map
    assert _no_hooks(mnv2)
    assert not mnv2.training


class _HalfGate(nn.Module):
    """Channels 0-1 keep only the left half of the map, channels 2-3 only the right half."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        w = a.shape[-1]
        mask = torch.zeros_like(a)
        mask[:, :2, :, : w // 2] = 1
        mask[:, 2:, :, w // 2 :] = 1
        return a * mask


def _positive_features() -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.abs_()
        conv.bias.fill_(0.1)
    return nn.Sequential(conv, nn.ReLU())


class _LeftRightNet(nn.Module):
    """Logit 1 depends only on the left half of the image, logit 0 only on the right half."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _positive_features()
        self.gate = _HalfGate()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.gate(self.features(x))).flatten(1))


def _left_mass(cams: np.ndarray) -> np.ndarray:
    w = cams.shape[-1]
    return cams[..., : w // 2].sum(axis=(1, 2)) / cams.sum(axis=(1, 2))


def test_grad_cam_finds_the_half_the_class_depends_on() -> None:
    model = _LeftRightNet().eval()
    assert find_target_layer(model, (32, 32))[0] == "gate"
    x = torch.rand(4, 3, 32, 48)  # non-square: catches a swapped H/W in the upsampling
    left, _ = grad_cam(model, x, target_class=1)
    right, _ = grad_cam(model, x, target_class=0)
    assert left.shape == (4, 32, 48)
    assert (_left_mass(left) > 0.95).all()
    assert (_left_mass(right) < 0.05).all()


class _LeftCropNet(nn.Module):
    """Both logits read one shared feature map, logit 1 only its left half (a spatial crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _positive_features()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        w = a.shape[-1]
        return torch.stack([a.mean(dim=(1, 2, 3)), a[..., : w // 2].mean(dim=(1, 2, 3))], 1)


def test_hirescam_localises_a_crop_that_grad_cam_averages_away() -> None:
    # Documents a real limitation: Grad-CAM weights each channel by its *spatially averaged*
    # gradient, so a head that reads only the left half of a channel still gets a CAM wherever
    # that channel fires. HiResCAM (gradient x activation per position) localises it.
    model = _LeftCropNet().eval()
    x = torch.rand(4, 3, 32, 32)
    hires, _ = grad_cam(model, x, target_class=1, method="hirescam")
    assert (_left_mass(hires) > 0.95).all()
    plain, _ = grad_cam(model, x, target_class=1, method="gradcam")
    assert (np.abs(_left_mass(plain) - 0.5) < 0.15).all()
    default, _ = grad_cam(model, x, target_class=1)  # HiResCAM is the default
    np.testing.assert_array_equal(default, hires)


# ---------------------------------------------------------------- overlays and PNGs


def test_overlay_cam() -> None:
    img = np.full((3, 8, 10), 200, dtype=np.uint8)
    cam = np.linspace(0, 1, 80, dtype=np.float32).reshape(8, 10)
    out = overlay_cam(img, cam)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert (overlay_cam(img, cam, alpha=0.0) == 200).all()
    hot = overlay_cam(img, np.ones((8, 10), np.float32), alpha=1.0)
    assert (hot[..., 0] > 100).all() and (hot[..., 2] < 50).all()  # jet(1) is dark red
    with pytest.raises(TransferlabError, match="cam is"):
        overlay_cam(img, cam[:4])


def test_save_explanations_writes_decodable_pngs(
    mnv2: nn.Module, images_u8: np.ndarray, tmp_path: Path
) -> None:
    paths = ["data/cat/1.jpg", "data/dog/1.jpg", "x/bird.png"]  # duplicate stems
    out = save_explanations(mnv2, images_u8, paths, ["cat", "dog", "bird"], MEAN, STD, tmp_path)
    assert len(out) == 3 and len({p.name for p in out}) == 3
    expected = (
        round(EXPLANATION_FIGSIZE[0] * EXPLANATION_DPI),
        round(EXPLANATION_FIGSIZE[1] * EXPLANATION_DPI),
    )
    for p in out:
        assert p.parent == tmp_path and _png(p) == expected
    chosen = save_explanations(
        mnv2, list(images_u8[:1]), ["a.jpg"], ["cat", "dog", "bird"], MEAN, STD,
        tmp_path / "chosen", target_class="dog", batch_size=1,
    )  # fmt: skip
    assert _png(chosen[0]) == expected
    with pytest.raises(TransferlabError, match="class names"):
        save_explanations(mnv2, images_u8[:1], ["a.jpg"], ["cat", "dog"], MEAN, STD, tmp_path)
    assert _no_hooks(mnv2)


# ------------------------------------------------- feature maps, bottleneck, filters


def test_feature_maps_default_stages(mnv2: nn.Module, images_u8: np.ndarray, tmp_path: Path):
    x = normalize(images_u8[:1], MEAN, STD)
    maps = feature_maps(mnv2, x)
    assert list(maps) == ["blocks.0", "blocks.2", "blocks.6"]  # early, middle, late
    shapes = [m.shape for m in maps.values()]
    assert shapes == [(16, 32, 32), (32, 8, 8), (320, 2, 2)]  # deeper: more channels, smaller
    assert _png(plot_feature_maps(maps, tmp_path / "maps.png", max_channels=8))[0] > 0
    seq = _small_cnn()
    assert default_feature_stages(seq) == ["1", "4", "6"]  # after each conv's BN/activation
    seq_maps = feature_maps(seq, torch.randn(1, 3, 32, 32))
    assert [m.shape for m in seq_maps.values()] == [(8, 32, 32), (16, 16, 16), (16, 16, 16)]
    assert (seq_maps["1"] >= 0).all()  # post-ReLU
    with pytest.raises(TransferlabError, match="not a submodule"):
        feature_maps(seq, torch.randn(1, 3, 32, 32), stages=["nope"])
    assert _no_hooks(mnv2) and _no_hooks(seq)


def test_bottleneck_vector(tmp_path: Path) -> None:
    body = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    net = ClassifierNet(body, nn.Linear(body.num_features, 2)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    vec = bottleneck_vector(net, x)
    with torch.no_grad():
        np.testing.assert_allclose(vec, net.body(x)[0].numpy(), rtol=1e-5, atol=1e-6)
    assert vec.shape == (1280,)
    timm_vec = bottleneck_vector(_timm("resnet18"), x)
    assert timm_vec.shape == (512,)
    assert bottleneck_vector(_small_cnn(), torch.randn(1, 3, 32, 32)).shape == (16,)
    assert _png(plot_bottleneck(vec, tmp_path / "bottleneck.png"))[0] > 0


def test_first_layer_filters(mnv2: nn.Module, tmp_path: Path) -> None:
    w = first_layer_filters(mnv2)
    assert w.shape == (32, 3, 3, 3)
    np.testing.assert_array_equal(w, mnv2.conv_stem.weight.detach().numpy())
    w[:] = 0  # a copy: editing it must not touch the model
    assert mnv2.conv_stem.weight.abs().sum() > 0
    assert _png(plot_filters(first_layer_filters(mnv2), tmp_path / "f.png"))[0] > 0
    assert _png(plot_filters(np.random.randn(5, 2, 5, 5), tmp_path / "g.png"))[0] > 0
    with pytest.raises(TransferlabError, match="no Conv2d"):
        first_layer_filters(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------- convolution demo


def test_mean_kernel_is_a_3x3_average_on_interior_pixels() -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(12, 15)).astype(np.float32)
    out = convolve(gray, "mean")
    assert out.shape == gray.shape
    manual = np.zeros_like(gray)
    for i in range(1, 11):
        for j in range(1, 14):
            manual[i, j] = gray[i - 1 : i + 2, j - 1 : j + 2].mean()
    np.testing.assert_allclose(out[1:-1, 1:-1], manual[1:-1, 1:-1], rtol=1e-5)
    # Reflect padding: a constant image stays constant, borders included (no dark frame).
    np.testing.assert_allclose(convolve(np.full((6, 6), 90.0), "gaussian"), 90.0, rtol=1e-6)


def test_sobel_x_responds_to_vertical_edges_only() -> None:
    vertical = np.zeros((16, 16), np.float32)
    vertical[:, 8:] = 255  # dark left, bright right
    horizontal = vertical.T.copy()
    sx_v = convolve(vertical, "sobel-x")
    assert np.abs(sx_v[:, 7:9]).min() > 500  # strong along the edge
    assert np.abs(sx_v[:, :6]).max() == 0 and np.abs(sx_v[:, 11:]).max() == 0
    assert np.abs(convolve(horizontal, "sobel-x")).max() == 0
    assert np.abs(convolve(horizontal, "sobel-y")).max() > 500
    shown = display_response(sx_v, "sobel-x")
    assert shown.dtype == np.uint8 and shown.max() == 255 and shown[:, 0].max() == 0


def test_convolve_accepts_rgb_and_matrix_strings() -> None:
    rgb = np.zeros((3, 10, 10), np.uint8)
    rgb[:, :, 5:] = 255
    np.testing.assert_allclose(to_grayscale(rgb), to_grayscale(rgb.transpose(1, 2, 0)))
    via_string = convolve(rgb, "1,0,-1;2,0,-2;1,0,-1")
    np.testing.assert_allclose(via_string, -convolve(rgb, "sobel-x"))
    np.testing.assert_allclose(convolve(rgb, KERNELS["sharpen"]), convolve(rgb, "sharpen"))
    assert convolve(rgb, np.ones((2, 2)) / 4).shape == (10, 10)  # even kernel, same size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2;3,4;5,6", "square"),
        ("1,2,3;4,5", "different lengths"),
        ("1,a;2,3", "'a' in row 1 is not a number"),
        ("", "empty"),
        ("1,2;;3,4", "row 2 is empty"),
        ("nan,1;1,1", "not finite"),
    ],
)
def test_parse_kernel_errors(text: str, message: str) -> None:
    with pytest.raises(TransferlabError, match=message):
        parse_kernel(text)


def test_parse_kernel_and_kernel_errors() -> None:
    np.testing.assert_array_equal(parse_kernel("1 0 -1; 2 0 -2; 1 0 -1;"), -KERNELS["sobel-x"])
    with pytest.raises(TransferlabError, match="unknown kernel"):
        convolve(np.zeros((5, 5)), "blur")
    with pytest.raises(TransferlabError, match="square"):
        convolve(np.zeros((5, 5)), np.ones((2, 3)))
    with pytest.raises(TransferlabError, match="too large"):
        convolve(np.zeros((3, 3)), np.ones((7, 7)))
    with pytest.raises(ValueError):
        KERNELS["mean"][0, 0] = 5  # read-only constants


def test_plot_convolution_png(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    for kernel in ["mean", "sobel-y", "1,0,-1;2,0,-2;1,0,-1"]:
        assert _png(plot_convolution(img, kernel, tmp_path / "conv.png")) == (1200, 420)


# ------------------------------------------------------- fixed-input-size models


def _scratch_net(size: int) -> nn.Module:
    from transferlab.scratch import build_scratch_body, scratch_recipe

    torch.manual_seed(0)
    body = build_scratch_body(scratch_recipe("basic", size))
    return ClassifierNet(body, nn.Linear(body.num_features, 2)).eval()


def test_fixed_size_models_need_their_own_input_size(tmp_path: Path) -> None:
    """A Flatten + Dense CNN takes one size only: the dummy forward must use it."""
    net = _scratch_net(80)
    with pytest.raises(TransferlabError, match=r"does not take a 64x64 input.*input_size"):
        find_target_layer(net, (64, 64))
    name, _ = find_target_layer(net, (80, 80))
    assert name == "body.pool3"  # the last spatial map, right before Flatten
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(2, 3, 80, 80), dtype=np.uint8)
    cams, _ = grad_cam(net, normalize(imgs, MEAN, STD), target_layer=name, input_size=(80, 80))
    assert cams.shape == (2, 80, 80)
    out = save_explanations(
        net, imgs, ["a.jpg", "b.jpg"], ["x", "y"], MEAN, STD, tmp_path, input_size=(80, 80)
    )
    assert len(out) == 2
    small = rng.integers(0, 256, size=(1, 3, 64, 64), dtype=np.uint8)
    with pytest.raises(TransferlabError, match="are 64x64 but the model takes 80x80"):
        grad_cam(net, normalize(small, MEAN, STD), input_size=(80, 80))
    with pytest.raises(TransferlabError, match="are 64x64 but the model takes 80x80"):
        feature_maps(net, normalize(small, MEAN, STD), input_size=(80, 80))
    maps = feature_maps(net, normalize(imgs[:1], MEAN, STD), input_size=(80, 80))
    assert list(maps) == default_feature_stages(net)
    assert _no_hooks(net)
