"""What a CNN classifier looks at and what it has learned.

* HiResCAM (and Grad-CAM) heatmaps on the last stride-16 stage, overlays and per-image PNGs;
* feature maps at an early, a middle and a late stage (edges -> textures -> object parts),
  the pooled bottleneck vector and the first layer's filters;
* a small convolution demo (mean, Gaussian, Sobel, sharpen, Laplacian or a user matrix).

Everything works on a plain ``nn.Module`` that maps normalized (n, 3, H, W) images to logits
(a transferlab ``ClassifierNet`` with ``.body``/``.head``, any timm classifier, or a hand-built
``nn.Sequential``). Models are never modified: every hook is removed and every module's
train/eval flag restored, also when an error is raised.

Figures are drawn on matplotlib ``Figure`` objects with an explicit Agg canvas instead of
pyplot: nothing needs a display, nothing touches the global backend other code may rely on,
and no figure is left registered with pyplot after saving.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.model import eval_mode

__all__ = [
    "KERNELS",
    "EXPLANATION_DPI",
    "EXPLANATION_FIGSIZE",
    "bottleneck_vector",
    "convolve",
    "default_feature_stages",
    "display_response",
    "feature_maps",
    "find_target_layer",
    "first_layer_filters",
    "grad_cam",
    "normalize",
    "overlay_cam",
    "parse_kernel",
    "plot_bottleneck",
    "plot_convolution",
    "plot_feature_maps",
    "plot_filters",
    "save_explanations",
    "to_grayscale",
]

# Fixed figure geometry (no bbox_inches="tight"), so a saved explanation always has the same
# pixel size whatever the title length: 800 x 440 px.
EXPLANATION_FIGSIZE = (8.0, 4.4)
EXPLANATION_DPI = 100

CamMethod = Literal["gradcam", "hirescam"]
LayerSpec = str | nn.Module | None


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def normalize(
    images_uint8: np.ndarray | Sequence[np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 images (3, H, W) or (n, 3, H, W) (or a list of (3, H, W)) -> float32 (n, 3, H, W).

    ``(x / 255 - mean) / std`` per channel, the same arithmetic as timm's eval transform.
    """
    arr = _as_uint8_batch(images_uint8)
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    if m.numel() != arr.shape[1] or s.numel() != arr.shape[1]:
        raise TransferlabError(
            f"mean/std have {m.numel()}/{s.numel()} values but the images have "
            f"{arr.shape[1]} channels; give one value per channel"
        )
    if bool((s == 0).any()):
        raise TransferlabError("std contains 0; normalization would divide by zero")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    return (x - m) / s


def _as_uint8_batch(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(images, np.ndarray):
        arr = images
    else:
        items = [np.asarray(im) for im in images]
        if not items:
            raise TransferlabError("no images given")
        if len({im.shape for im in items}) > 1:
            raise TransferlabError(
                "images have different sizes; resize/crop them to one size first "
                f"(got {sorted({im.shape for im in items})})"
            )
        arr = np.stack(items)
    if arr.dtype != np.uint8:
        raise TransferlabError(f"images must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise TransferlabError(
            f"images must be (3, H, W) or (n, 3, H, W) channel-first RGB, got shape {arr.shape}"
        )
    return arr


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------------------
# Which layer to explain
# --------------------------------------------------------------------------------------

_GLOBAL_POOLS: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
try:  # timm's pooling wrapper; imported lazily-safe because timm is a hard dependency anyway
    from timm.layers import SelectAdaptivePool2d

    _GLOBAL_POOLS = (*_GLOBAL_POOLS, SelectAdaptivePool2d)
except ImportError:  # pragma: no cover - timm is in the requirements
    pass


@dataclass
class _Record:
    name: str
    module: nn.Module
    output: torch.Tensor


def _trace(model: nn.Module, input_size: tuple[int, int]) -> list[_Record]:
    """Every submodule's tensor output, in the order the modules *finish* (post-order)."""
    records: list[_Record] = []

    def make_hook(name: str):
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                records.append(_Record(name, module, output))

        return hook

    device, dtype = _model_device_dtype(model)
    handles = []
    try:
        for name, module in model.named_modules():
            # nn.Identity only forwards its input; naming it as "the layer" would be confusing.
            if name and not isinstance(module, nn.Identity):
                handles.append(module.register_forward_hook(make_hook(name)))
        x = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)
        with eval_mode(model), torch.no_grad():
            try:
                model(x)
            except RuntimeError as e:  # e.g. Flatten + Linear sized for another resolution
                h, w = input_size
                raise TransferlabError(
                    f"{type(model).__name__} does not take a {h}x{w} input ({e}); pass the "
                    "model's own input size (SavedModel.preprocess.input_size) as input_size"
                ) from e
    finally:
        for h in handles:
            h.remove()
    return records


def _timm_feature_info(model: nn.Module) -> list[tuple[str, int, int]]:
    """(module name relative to ``model``, reduction, channels) of the outermost timm
    ``feature_info``."""
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if not info:
            continue
        try:
            entries = [
                (str(e["module"]), int(e.get("reduction", 0)), int(e.get("num_chs", 0)))
                for e in info
            ]
        except (TypeError, KeyError, ValueError):
            continue
        full = [(f"{prefix}.{n}" if prefix else n, r, c) for n, r, c in entries]
        return [(n, r, c) for n, r, c in full if _has_submodule(model, n)]
    return []


def _timm_feature_modules(model: nn.Module) -> list[str]:
    return [name for name, _, _ in _timm_feature_info(model)]


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _default_input_size(model: nn.Module) -> tuple[int, int]:
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            _, h, w = cfg["input_size"]
            return int(h), int(w)
    return 224, 224


# A 7x7 map (stride 32 at 224 px) is too coarse to say which fifth of the pixels matters: on
# cats_vs_dogs_small, blanking the top 20% of a last-stage Grad-CAM lowers p(class) no more
# than blanking 20% random pixels (benchmarks/gradcam_deletion.py). The last stage at stride
# 16 (14x14) with HiResCAM beats random pixels and a random backbone's CAM on every seed tried.
DEFAULT_CAM_STRIDE = 16
DEFAULT_CAM_METHOD: CamMethod = "hirescam"


def find_target_layer(
    model: nn.Module,
    input_size: tuple[int, int] | None = None,
    *,
    max_stride: int | None = DEFAULT_CAM_STRIDE,
) -> tuple[str, nn.Module]:
    """The deepest conv stage whose feature map has output stride <= ``max_stride``.

    ``max_stride=None`` gives the last conv stage: the last module with a 4-D (n, C, h, w)
    output before global pooling. The default (16) gives the last stage at stride 16, a 14x14
    map at 224 px (``blocks.4`` for MobileNetV2/EfficientNet, ``layer3`` for ResNet); a model
    whose every map is finer (the scratch CNNs, stride 8) gets its last conv stage. When no
    map is that fine the last conv stage is used. Stages and their strides come from timm's
    ``feature_info``; models without one (plain ``nn.Sequential`` CNNs) get the last conv stage.

    Found by tracing one dummy forward pass (``input_size``; default the model's pretrained
    input size, else 224x224; a model that only takes one size, such as the scratch CNNs with
    Flatten + Dense, needs its own: ``SavedModel.preprocess.input_size``) rather than trusting
    ``feature_info[-1]``: for MobileNet and EfficientNet that entry is ``blocks.6``, which
    skips the final 1x1 ``conv_head`` the classifier actually reads. When several modules
    return the very same tensor (a stage, its last block, the block's activation) the timm
    ``feature_info`` name is preferred, else the outermost one, e.g. ``layer4`` (resnet),
    ``bn2`` (mobilenet/efficientnet: conv_head + BN + act), ``stages.3`` (convnext),
    ``body.bn2`` for a transferlab ``ClassifierNet`` (all with ``max_stride=None``).
    """
    size = input_size or _default_input_size(model)
    records = _trace(model, size)
    # Everything after the first global pool is (n, C, 1, 1) or flat: not a spatial map,
    # even when it is still 4-D (convnext's head norm, torchvision's avgpool output).
    for i, rec in enumerate(records):
        if isinstance(rec.module, _GLOBAL_POOLS):
            records = records[:i]
            break
    spatial = [r for r in records if r.output.ndim == 4]
    if not spatial:
        raise TransferlabError(
            f"{type(model).__name__}: no submodule returns a 4-D (n, C, h, w) feature map for a "
            f"{size[0]}x{size[1]} input; pass target_layer= explicitly"
        )
    info = _timm_feature_info(model)
    stages: list[_Record] = []
    if max_stride is not None and any(r > max_stride for _, r, _ in info):
        # Stage outputs come from feature_info: a stride test on every traced module would
        # also accept the next stage's 1x1 expansion conv, which runs before its downsampling.
        names = {n for n, r, _ in info if 0 < r <= max_stride}
        stages = [r for r in spatial if r.name in names]
    if stages:
        chosen = stages[-1]
    else:
        last = spatial[-1]
        same = [r for r in spatial if r.output is last.output]
        preferred = {name for name, _, _ in info}
        chosen = next((r for r in reversed(same) if r.name in preferred), last)
    _refuse_non_convolutional(model, chosen, records, info)
    return chosen.name, chosen.module


def _refuse_non_convolutional(
    model: nn.Module, chosen: _Record, records: list[_Record], info: list[tuple[str, int, int]]
) -> None:
    """CAMs here read (n, C, h, w) maps. A transformer's only such map is its patch stem (then
    tokens); Swin-like stages are channels-last. Either would give a plausible-looking, wrong
    heatmap, so say so instead."""
    name = type(model).__name__
    channels = {n: c for n, _, c in info}.get(chosen.name, 0)
    shape = tuple(chosen.output.shape)
    if channels and shape[1] != channels and shape[-1] == channels:
        raise TransferlabError(
            f"{name}: {chosen.name!r} returns channels-last maps {shape} (a Swin-like model); "
            "class activation maps need (n, C, h, w). Pass target_layer= a channels-first module"
        )
    # Hybrids (MobileViT, EfficientFormer) run token blocks between conv stages: fine. A model
    # whose every later output is tokens has turned into a transformer after this map (its stem).
    later = [
        r.output.ndim for r in records[next(i for i, r in enumerate(records) if r is chosen) + 1 :]
    ]
    if 3 in later and 4 not in later:
        raise TransferlabError(
            f"{name}: the last (n, C, h, w) map is {chosen.name!r}, after which the model works "
            "on tokens (a vision transformer?); class activation maps need a convolutional "
            "feature map. Pass target_layer= a module with an (n, C, h, w) output if it has one"
        )


def _resolve_layer(
    model: nn.Module, target_layer: LayerSpec, input_size: tuple[int, int]
) -> tuple[str, nn.Module]:
    if target_layer is None:
        return find_target_layer(model, input_size)
    if isinstance(target_layer, str):
        try:
            return target_layer, model.get_submodule(target_layer)
        except AttributeError as e:
            auto, _ = find_target_layer(model, input_size)
            raise TransferlabError(
                f"target layer {target_layer!r} is not a submodule of {type(model).__name__}; "
                f"use a name from model.named_modules() (the automatic choice is {auto!r})"
            ) from e
    if isinstance(target_layer, nn.Module):
        for name, module in model.named_modules():
            if module is target_layer:
                return name, module
        raise TransferlabError("target_layer module is not part of the model being explained")
    raise TransferlabError(
        f"target_layer must be a module name, a module or None, not {type(target_layer).__name__}"
    )


# --------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------


def _resolve_classes(
    target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None,
    logits: torch.Tensor,
) -> torch.Tensor:
    n, c = logits.shape
    if target_class is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target_class, (int, np.integer)) and not isinstance(target_class, bool):
        classes = torch.full((n,), int(target_class), dtype=torch.long)
    else:
        try:
            values = [int(v) for v in np.asarray(target_class).reshape(-1)]
        except (TypeError, ValueError) as e:
            raise TransferlabError(
                f"target_class must be an int, a sequence of ints or None, got {target_class!r}"
            ) from e
        if len(values) != n:
            raise TransferlabError(
                f"target_class has {len(values)} entries for {n} images; give one per image"
            )
        classes = torch.tensor(values, dtype=torch.long)
    bad = [int(v) for v in classes if not 0 <= int(v) < c]
    if bad:
        raise TransferlabError(f"target_class {bad[0]} is out of range: the model has {c} classes")
    return classes.to(logits.device)


def _check_input_size(height: int, width: int, input_size: Sequence[int] | None) -> None:
    """Images must be the size the model was trained at, when that is known."""
    if input_size is None:
        return
    h, w = (int(v) for v in input_size)
    if (height, width) != (h, w):
        raise TransferlabError(
            f"the images are {height}x{width} but the model takes {h}x{w}; load them with the "
            "run's preprocessing (transferlab.data.images.load_image(path, saved.preprocess))"
        )


def _cam_impl(
    model: nn.Module,
    images: torch.Tensor,
    target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None,
    target_layer: LayerSpec,
    method: CamMethod,
    input_size: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(cams, classes, logits); logits are returned so callers need no second forward pass."""
    if method not in ("gradcam", "hirescam"):
        raise TransferlabError(f"unknown CAM method {method!r}; use 'gradcam' or 'hirescam'")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TransferlabError(
            "images must be a normalized float tensor (n, 3, H, W); use normalize() on uint8 images"
        )
    n, _, height, width = images.shape
    _check_input_size(height, width, input_size)
    # any layer search traces at the images' own size: the size the model is about to get
    name, layer = _resolve_layer(model, target_layer, (height, width))
    device, dtype = _model_device_dtype(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise TransferlabError(
                f"target layer {name!r} returns {shape}, not a 4-D (n, C, h, w) feature map; "
                "choose a convolutional layer"
            )
        # Frozen models (requires_grad=False everywhere) give activations without a graph:
        # make the activation itself the leaf we differentiate against, no parameter touched.
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        captured.append(act)
        # Hand a copy downstream so a following in-place op (ReLU(inplace=True)) can neither
        # overwrite the activation we keep nor hit "leaf variable used in an in-place op".
        return act.clone()

    # inference_mode(False)/enable_grad: callers often sit inside torch.no_grad() or
    # inference_mode() (prediction code); Grad-CAM needs a graph regardless.
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = images.detach().to(device=device, dtype=dtype).clone()
        handle = layer.register_forward_hook(hook)
        try:
            logits = model(x)
        finally:
            handle.remove()
        if not captured:
            raise TransferlabError(f"target layer {name!r} is never run by the model's forward")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            raise TransferlabError(
                "the model must return logits of shape (n, classes); got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}"
            )
        act = captured[-1]  # a module run twice: the last call is the one nearest the output
        classes = _resolve_classes(target_class, logits)
        score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode
        if not score.requires_grad:
            raise TransferlabError("the model's logits carry no gradient (forward under no_grad?)")
        # autograd.grad (not .backward()) so no parameter's .grad is created or accumulated.
        (grads,) = torch.autograd.grad(score, act, allow_unused=True)
        if grads is None:
            raise TransferlabError(
                f"the logits do not depend on target layer {name!r}; choose a layer on the "
                "path from the input to the classifier"
            )
        with torch.no_grad():
            if method == "gradcam":
                # Grad-CAM: one weight per channel (spatially averaged gradient).
                cam = (grads.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)
            else:
                # HiResCAM: gradient x activation per position; faithful when the head treats
                # positions differently (Grad-CAM's averaged weights cannot express that).
                cam = (grads * act).sum(dim=1)
            cam = F.relu(cam)[:, None].float()
            cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
            cam = cam[:, 0]
            lo = cam.amin(dim=(1, 2), keepdim=True)
            span = cam.amax(dim=(1, 2), keepdim=True) - lo
            # A flat map carries no location information: report zeros, not 0/0.
            cam = torch.where(span > 1e-12, (cam - lo) / span.clamp_min(1e-12), 0.0)
    return (
        cam.cpu().numpy().astype(np.float32),
        classes.cpu().numpy().astype(np.int64),
        logits.detach(),
    )


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target_class: int | Sequence[int] | None = None,
    target_layer: str | nn.Module | None = None,
    method: CamMethod = DEFAULT_CAM_METHOD,
    input_size: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class activation maps (HiResCAM by default, or Grad-CAM) for normalized images (n, 3, H, W).

    Returns ``(cams, classes)``: cams (n, H, W) float32 in [0, 1] (ReLU'd, bilinearly upsampled
    to the input size, min-max scaled per image; all zeros when nothing speaks for the class)
    and the class explained for each image (the predicted class when ``target_class`` is None).
    ``target_layer`` is a module name (``model.get_submodule``), a module, or None for
    :func:`find_target_layer` (the last stage at stride 16). ``method="hirescam"`` (default)
    multiplies gradients and activations per position; ``"gradcam"`` first averages the
    gradients per channel, losing where in the map each channel helps (on the last conv stage
    before global pooling and a linear head the two are identical). ``input_size`` (H, W): the
    size the model was trained at (``SavedModel.preprocess.input_size``); images of another size are
    refused with a clear error instead of failing inside the model.

    The model is run in eval mode and left exactly as found (train/eval flags, requires_grad,
    no hooks, no parameter ``.grad``), also when an error is raised.
    """
    cams, classes, _ = _cam_impl(model, images, target_class, target_layer, method, input_size)
    return cams, classes


def overlay_cam(image_uint8: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a CAM (H, W) in [0, 1] as a jet heatmap over an image (3, H, W) -> (H, W, 3) uint8."""
    img = np.asarray(image_uint8)
    cam = np.asarray(cam, dtype=np.float32)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise TransferlabError(f"image must be uint8 (3, H, W), got {img.dtype} {img.shape}")
    if cam.shape != img.shape[1:]:
        raise TransferlabError(f"cam is {cam.shape} but the image is {img.shape[1:]}")
    if not 0.0 <= alpha <= 1.0:
        raise TransferlabError(f"alpha must be in [0, 1], got {alpha}")
    heat = colormaps["jet"](np.clip(np.nan_to_num(cam), 0.0, 1.0))[..., :3]
    base = img.transpose(1, 2, 0).astype(np.float32) / 255.0
    out = (1.0 - alpha) * base + alpha * heat
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def save_explanations(
    model: nn.Module,
    images_uint8: np.ndarray | Sequence[np.ndarray],
    paths: Sequence[str | Path],
    classes: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | Path,
    *,
    target_class: int | str | Sequence[int] | None = None,
    target_layer: str | nn.Module | None = None,
    method: CamMethod = DEFAULT_CAM_METHOD,
    batch_size: int = 16,
    input_size: Sequence[int] | None = None,
) -> list[Path]:
    """One PNG per image (``<stem>_gradcam.png``): original | CAM overlay (see :func:`grad_cam`).

    The title gives the predicted class and its softmax probability, and, when
    ``target_class`` is given (index or class name), the explained class and its probability.
    Images are (3, H, W) uint8, already resized/cropped; ``paths`` only name the outputs.
    ``input_size``: the model's (``SavedModel.preprocess.input_size``), checked against the
    images' size, as in :func:`grad_cam`.
    """
    arr = _as_uint8_batch(images_uint8)
    if len(paths) != len(arr):
        raise TransferlabError(f"{len(paths)} paths for {len(arr)} images; give one per image")
    if isinstance(target_class, str):
        if target_class not in classes:
            raise TransferlabError(f"unknown class {target_class!r}; classes are {classes}")
        target_class = classes.index(target_class)
    if target_class is not None and not isinstance(target_class, (int, np.integer)):
        target_class = list(target_class)
        if len(target_class) != len(arr):
            raise TransferlabError(
                f"target_class has {len(target_class)} entries for {len(arr)} images"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used_names: set[str] = set()
    for start in range(0, len(arr), max(1, batch_size)):
        chunk = arr[start : start + batch_size]
        tc = target_class
        if isinstance(tc, list):
            tc = tc[start : start + batch_size]
        cams, used, logits = _cam_impl(
            model, normalize(chunk, mean, std), tc, target_layer, method, input_size
        )
        if logits.shape[1] != len(classes):
            raise TransferlabError(
                f"the model has {logits.shape[1]} outputs but {len(classes)} class names"
            )
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        for i in range(len(chunk)):
            src = Path(paths[start + i])
            pred = int(probs[i].argmax())
            title = f"{src.name}: predicted {classes[pred]} ({probs[i, pred]:.2f})"
            if target_class is not None:
                c = int(used[i])
                title += f"  |  CAM for {classes[c]} ({probs[i, c]:.2f})"
            dest = out / _unique_name(src.stem, used_names)
            _save_explanation_png(chunk[i], cams[i], title, dest)
            written.append(dest)
    return written


def _unique_name(stem: str, used: set[str]) -> str:
    # cat/1.jpg and dog/1.jpg must not overwrite each other's explanation.
    name, k = f"{stem}_gradcam.png", 1
    while name in used:
        name, k = f"{stem}_{k}_gradcam.png", k + 1
    used.add(name)
    return name


def _new_figure(figsize: tuple[float, float], dpi: int = EXPLANATION_DPI) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: str | Path) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the pixel size stays figsize * dpi, predictable for callers.
    fig.savefig(path, format="png", dpi=fig.dpi)
    fig.clear()
    return path


def _save_explanation_png(image: np.ndarray, cam: np.ndarray, title: str, dest: Path) -> None:
    fig = _new_figure(EXPLANATION_FIGSIZE)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image.transpose(1, 2, 0))
    ax1.set_title("image", fontsize=9)
    ax2.imshow(overlay_cam(image, cam))
    ax2.set_title("Grad-CAM (red = most evidence)", fontsize=9)
    for ax in (ax1, ax2):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, dest)


# --------------------------------------------------------------------------------------
# Feature maps, bottleneck, filters
# --------------------------------------------------------------------------------------


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.BatchNorm2d,
)


def default_feature_stages(model: nn.Module) -> list[str]:
    """Three stage names (early, middle, late) for :func:`feature_maps`.

    From timm ``feature_info`` when present (first, middle, last entry), else from the
    conv-containing children of the model (descending through single wrappers such as
    ``.body``), where a bare Conv2d is replaced by the BN/activation right after it so the
    maps show what the next layer sees.
    """
    feats = _timm_feature_modules(model)
    if not feats:
        prefix, container = "", model
        while True:
            kids = [(n, m) for n, m in container.named_children() if _contains_conv(m)]
            if len(kids) == 1 and not isinstance(kids[0][1], nn.Conv2d):
                prefix = f"{prefix}{kids[0][0]}."
                container = kids[0][1]
                continue
            break
        children = list(container.named_children())
        for i, (name, module) in enumerate(children):
            if not _contains_conv(module):
                continue
            if isinstance(module, nn.Conv2d):
                j = i
                while j + 1 < len(children) and isinstance(children[j + 1][1], _ACTIVATIONS):
                    j += 1
                name = children[j][0]
            feats.append(prefix + name)
    if not feats:
        raise TransferlabError(
            f"{type(model).__name__} has no convolutional layers; pass stages= explicitly"
        )
    k = len(feats)
    picks = sorted({0, (k - 1) // 2, k - 1})
    return [feats[i] for i in picks]


def feature_maps(
    model: nn.Module,
    image: torch.Tensor,
    *,
    stages: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Activations (C, h, w) of one normalized image (1, 3, H, W) at the given stage names.

    Default stages: :func:`default_feature_stages` (early -> middle -> late; found from the
    module tree, no forward pass). Keys keep the order of ``stages``. ``input_size``: the
    model's (``SavedModel.preprocess.input_size``), checked against the image's size.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] != 1:
        raise TransferlabError("feature_maps takes one normalized image tensor (1, 3, H, W)")
    _check_input_size(int(image.shape[2]), int(image.shape[3]), input_size)
    names = list(stages) if stages is not None else default_feature_stages(model)
    modules = {}
    for name in names:
        if not _has_submodule(model, name):
            raise TransferlabError(
                f"stage {name!r} is not a submodule of {type(model).__name__}; "
                f"the default stages are {default_feature_stages(model)}"
            )
        modules[name] = model.get_submodule(name)
    out: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _i: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                out[name] = output.detach()

        return hook

    device, dtype = _model_device_dtype(model)
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(image.detach().to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    result: dict[str, np.ndarray] = {}
    for name in names:
        t = out.get(name)
        if t is None or t.ndim != 4:
            got = "nothing" if t is None else f"shape {tuple(t.shape)}"
            raise TransferlabError(f"stage {name!r} gave {got}, not a (1, C, h, w) feature map")
        result[name] = t[0].float().cpu().numpy()
    return result


def plot_feature_maps(
    maps: dict[str, np.ndarray], out_path: str | Path, max_channels: int = 16
) -> Path:
    """A grid of channels per stage, top to bottom (the "edges -> parts" figure).

    Shows the ``max_channels`` channels with the highest mean activation: after ReLU many
    channels are silent for a given image, and the first channels by index are often blank.
    Each channel is min-max scaled on its own so weak but structured maps stay visible.
    """
    if not maps:
        raise TransferlabError("no feature maps to plot")
    max_channels = max(1, int(max_channels))
    ncols = min(8, max_channels)
    rows_per_stage = [math.ceil(min(max_channels, m.shape[0]) / ncols) for m in maps.values()]
    fig = _new_figure((ncols * 1.3 + 0.4, sum(rows_per_stage) * 1.3 + 0.6 * len(maps)))
    subfigs = fig.subfigures(len(maps), 1, height_ratios=[r + 0.5 for r in rows_per_stage])
    subfigs = np.atleast_1d(subfigs)
    for sub, (name, fmap), nrows in zip(subfigs, maps.items(), rows_per_stage, strict=True):
        fmap = np.asarray(fmap, dtype=np.float32)
        if fmap.ndim != 3:
            raise TransferlabError(f"feature map {name!r} must be (C, h, w), got {fmap.shape}")
        order = np.argsort(-fmap.mean(axis=(1, 2)), kind="stable")[:max_channels]
        c, h, w = fmap.shape
        sub.suptitle(f"{name}: {c} channels, {h}x{w} (top {len(order)} by mean activation)")
        axes = np.atleast_1d(sub.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, ch in zip(axes, order, strict=False):
            ax.imshow(_minmax(fmap[ch]), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"#{ch}", fontsize=7)
    return _save(fig, out_path)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def bottleneck_vector(model: nn.Module, image: torch.Tensor) -> np.ndarray:
    """The pooled feature vector (D,) the classifier head reads, for one image (1, 3, H, W).

    ``model.body(x)`` for a transferlab model, timm's ``forward_head(pre_logits=True)`` for a
    timm classifier, else the global average of the last conv stage's output.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] != 1:
        raise TransferlabError("bottleneck_vector takes one normalized image tensor (1, 3, H, W)")
    device, dtype = _model_device_dtype(model)
    x = image.detach().to(device=device, dtype=dtype)
    with eval_mode(model), torch.no_grad():
        body = getattr(model, "body", None)
        if isinstance(body, nn.Module):
            feats = body(x)
        elif hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            last, _ = find_target_layer(model, x.shape[-2:], max_stride=None)
            maps = feature_maps(model, x, stages=[last])
            return next(iter(maps.values())).mean(axis=(1, 2))
    if feats.ndim == 4:  # a body that stops before pooling
        feats = feats.mean(dim=(2, 3))
    return feats.reshape(feats.shape[0], -1)[0].float().cpu().numpy()


def plot_bottleneck(vec: np.ndarray, out_path: str | Path) -> Path:
    """The bottleneck vector as values by index and as a near-square heat grid."""
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise TransferlabError("empty bottleneck vector")
    fig = _new_figure((11.0, 3.8))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    ax1.bar(np.arange(v.size), v, width=1.0, color="tab:blue")
    ax1.set_xlim(-0.5, v.size - 0.5)
    ax1.set_xlabel("feature index")
    ax1.set_ylabel("activation")
    zeros = float(np.mean(np.abs(v) < 1e-6))
    ax1.set_title(
        f"{v.size}-d bottleneck: mean {v.mean():.3g}, max {v.max():.3g}, {zeros:.0%} zero"
    )
    cols = math.ceil(math.sqrt(v.size))
    grid = np.full(cols * math.ceil(v.size / cols), np.nan, dtype=np.float32)
    grid[: v.size] = v
    im = ax2.imshow(grid.reshape(-1, cols), cmap="magma", interpolation="nearest")
    ax2.set_title("as a grid (row-major)")
    ax2.axis("off")
    fig.colorbar(im, ax=ax2, fraction=0.046)
    return _save(fig, out_path)


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """Weights (out, in, k, k) of the first Conv2d in the model, as float32 numpy."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().float().cpu().numpy().copy()
    raise TransferlabError(f"{type(model).__name__} has no Conv2d layer")


def plot_filters(weights: np.ndarray, out_path: str | Path) -> Path:
    """First-layer filters as a grid of tiny images.

    3-channel filters are drawn as RGB after per-filter min-max scaling (so colour-opponent
    and edge filters show up as in the classic AlexNet figure); other filters as the mean over
    their input channels in grey.
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 4:
        raise TransferlabError(f"filters must be (out, in, k, k), got shape {w.shape}")
    n = w.shape[0]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = _new_figure((ncols * 0.9 + 0.4, nrows * 0.9 + 0.8))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, ax in enumerate(axes[:n]):
        if w.shape[1] == 3:
            ax.imshow(_minmax(w[i]).transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(_minmax(w[i].mean(axis=0)), cmap="gray", interpolation="nearest")
    # All-zero filters (pruned/dead, common in quantized checkpoints) show as black tiles.
    dead = int((np.abs(w).reshape(n, -1).max(axis=1) == 0).sum())
    shape = "x".join(str(d) for d in w.shape)
    fig.suptitle(f"first-layer filters ({shape}; {dead} all-zero, shown black)")
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------
# Convolution demo
# --------------------------------------------------------------------------------------


def _kernel(values: list[list[float]], scale: float = 1.0) -> np.ndarray:
    k = np.asarray(values, dtype=np.float32) * np.float32(scale)
    k.setflags(write=False)  # module-level constants: nobody may edit them in place
    return k


KERNELS: dict[str, np.ndarray] = {
    "mean": _kernel([[1, 1, 1], [1, 1, 1], [1, 1, 1]], 1 / 9),  # the tutorial's example
    "gaussian": _kernel([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16),
    # Applied as cross-correlation (like every CNN layer): sobel-x is positive where the
    # image gets brighter to the right, i.e. it finds vertical edges.
    "sobel-x": _kernel([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
    "sobel-y": _kernel([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
    "sharpen": _kernel([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
    "edge": _kernel([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),  # 4-neighbour Laplacian
}

_MATRIX_EXAMPLE = "'1,0,-1;2,0,-2;1,0,-1'"


def parse_kernel(text: str) -> np.ndarray:
    """A square matrix from text: rows separated by ';', values by ',' (or spaces)."""
    src = str(text).strip()
    if not src:
        raise TransferlabError(f"empty kernel; write a square matrix like {_MATRIX_EXAMPLE}")
    rows: list[list[float]] = []
    for r, row in enumerate(src.rstrip(";").split(";"), start=1):
        cells = [c for c in re.split(r"[,\s]+", row.strip()) if c]
        if not cells:
            raise TransferlabError(f"kernel {src!r}: row {r} is empty; e.g. {_MATRIX_EXAMPLE}")
        values = []
        for cell in cells:
            try:
                v = float(cell)
            except ValueError:
                raise TransferlabError(
                    f"kernel {src!r}: {cell!r} in row {r} is not a number; write rows "
                    f"separated by ';' and numbers by ',', e.g. {_MATRIX_EXAMPLE}"
                ) from None
            if not math.isfinite(v):
                raise TransferlabError(f"kernel {src!r}: {cell!r} in row {r} is not finite")
            values.append(v)
        rows.append(values)
    lengths = [len(r) for r in rows]
    if len(set(lengths)) > 1:
        raise TransferlabError(
            f"kernel {src!r}: rows have different lengths {lengths}; every row needs the same "
            "number of values"
        )
    if lengths[0] != len(rows):
        raise TransferlabError(
            f"kernel {src!r} is {len(rows)}x{lengths[0]}; it must be square (k x k), "
            f"e.g. {_MATRIX_EXAMPLE}"
        )
    return np.asarray(rows, dtype=np.float32)


def _as_kernel(kernel: str | np.ndarray) -> tuple[str, np.ndarray]:
    """(display name, k x k float32 kernel)."""
    if isinstance(kernel, str):
        key = kernel.strip().lower()
        if key in KERNELS:
            return key, KERNELS[key]
        if re.fullmatch(r"[\s\d.,;eE+\-]+", kernel.strip() or "x"):
            return "custom", parse_kernel(kernel)
        raise TransferlabError(
            f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)} or a matrix like "
            f"{_MATRIX_EXAMPLE}"
        )
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.size == 0:
        raise TransferlabError(f"kernel must be a square (k, k) matrix, got shape {k.shape}")
    if not np.isfinite(k).all():
        raise TransferlabError("kernel contains NaN or infinite values")
    return "custom", k


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W) grey, (3, H, W) / (1, H, W) channel-first or (H, W, 3) RGB -> float32 (H, W), 0..255.

    Channel-first wins when both readings are possible (the project's images are (3, H, W)).
    RGB uses ITU-R BT.601 luma weights, the same as PIL's ``convert("L")``.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        return a.astype(np.float32)
    if a.ndim == 3:
        if a.shape[0] in (1, 3):
            chw = a
        elif a.shape[-1] in (1, 3):
            chw = a.transpose(2, 0, 1)
        else:
            raise TransferlabError(f"image must be (H, W), (3, H, W) or (H, W, 3); got {a.shape}")
        if chw.shape[0] == 1:
            return chw[0].astype(np.float32)
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return (chw.astype(np.float32) * luma).sum(axis=0)
    raise TransferlabError(f"image must be (H, W), (3, H, W) or (H, W, 3); got {a.shape}")


def convolve(image_uint8_or_gray: np.ndarray, kernel: str | np.ndarray) -> np.ndarray:
    """Convolve the grayscale image with a kernel: float32 (H, W) response, same size as input.

    ``kernel`` is a name from :data:`KERNELS`, a matrix string ("1,0,-1;2,0,-2;1,0,-1") or an
    array. Uses ``torch.nn.functional.conv2d`` -- exactly what a CNN layer computes
    (cross-correlation, no kernel flip) -- with reflect padding so the borders do not turn into
    fake edges. The raw response can be negative or above 255; :func:`display_response` turns
    it into a viewable uint8 image (edge kernels as magnitude).
    """
    _, k = _as_kernel(kernel)
    gray = to_grayscale(image_uint8_or_gray)
    kh, kw = k.shape
    h, w = gray.shape
    # 'same' output: (k-1) padding split left/right, top/bottom (uneven for even k).
    top, left = (kh - 1) // 2, (kw - 1) // 2
    bottom, right = kh - 1 - top, kw - 1 - left
    if max(top, bottom) >= h or max(left, right) >= w:
        raise TransferlabError(f"a {kh}x{kw} kernel is too large for a {h}x{w} image")
    x = torch.from_numpy(np.ascontiguousarray(gray))[None, None]
    if kh > 1 or kw > 1:
        x = F.pad(x, (left, right, top, bottom), mode="reflect")
    with torch.no_grad():
        y = F.conv2d(x, torch.tensor(k)[None, None])  # a copy: KERNELS arrays are read-only
    return y[0, 0].numpy()


def display_response(response: np.ndarray, kernel: str | np.ndarray) -> np.ndarray:
    """A convolution response as uint8 (H, W) for display.

    Derivative kernels (weights summing to ~0: Sobel, Laplacian, most user edge kernels) give
    signed responses around 0, so their magnitude is shown, scaled so the strongest edge is
    255. Smoothing/sharpening kernels (weights summing to ~1) keep image brightness and are
    clipped to 0..255.
    """
    _, k = _as_kernel(kernel)
    r = np.asarray(response, dtype=np.float32)
    if abs(float(k.sum())) < 1e-6:
        mag = np.abs(r)
        peak = float(mag.max())
        r = mag * (255.0 / peak) if peak > 0 else np.zeros_like(mag)
    return np.clip(np.rint(r), 0, 255).astype(np.uint8)


def plot_convolution(image: np.ndarray, kernel: str | np.ndarray, out_path: str | Path) -> Path:
    """Input (grey) | kernel values as a small matrix | output, side by side (1200 x 420 px)."""
    name, k = _as_kernel(kernel)
    gray = to_grayscale(image)
    shown = display_response(convolve(gray, k), k)
    fig = _new_figure((12.0, 4.2))
    ax_in, ax_k, ax_out = fig.subplots(1, 3, width_ratios=[1, 0.7, 1])
    ax_in.imshow(gray, cmap="gray", vmin=0, vmax=255)
    ax_in.set_title("input (grayscale)")
    lim = float(np.abs(k).max()) or 1.0
    ax_k.imshow(k, cmap="coolwarm", vmin=-lim, vmax=lim)
    if k.shape[0] <= 7:  # beyond that the numbers no longer fit in their cells
        for (i, j), v in np.ndenumerate(k):
            ax_k.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=10)
    ax_k.set_xticks([])
    ax_k.set_yticks([])
    ax_k.set_title(f"kernel: {name} ({k.shape[0]}x{k.shape[1]})")
    ax_out.imshow(shown, cmap="gray", vmin=0, vmax=255)
    edge = abs(float(k.sum())) < 1e-6
    ax_out.set_title("output |response|, scaled" if edge else "output")
    for ax in (ax_in, ax_out):
        ax.axis("off")
    return _save(fig, out_path)
