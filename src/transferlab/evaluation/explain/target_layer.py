"""Which layer a class activation map reads: the last conv stage at a given output stride,
found by tracing one forward pass, and a refusal for models whose maps would mislead
(transformers, channels-last stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.common import has_submodule, model_device_dtype
from transferlab.model import EnsembleBody, EnsembleMember, eval_mode

CamMethod = Literal["gradcam", "hirescam"]
LayerSpec = str | nn.Module | None

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

    device, dtype = model_device_dtype(model)
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
        return [(n, r, c) for n, r, c in full if has_submodule(model, n)]
    return []


def timm_feature_names(model: nn.Module) -> list[str]:
    """Module names of timm's ``feature_info`` stages, shallow to deep (empty for non-timm)."""
    return [name for name, _, _ in _timm_feature_info(model)]


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
    ``body.bn2`` for a transferlab ``ClassifierNet`` (all with ``max_stride=None``). An
    ensemble's output is read at its heaviest member's stage (``body.members.<i>.body.…``).
    """
    if (member := _heaviest_member(model)) is not None:  # each member has its own maps
        name, layer = find_target_layer(member[1], member[1].input_size, max_stride=max_stride)
        return f"{member[0]}.{name}", layer
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


def _heaviest_member(model: nn.Module) -> tuple[str, EnsembleMember] | None:
    """For an ensemble (:class:`~transferlab.model.EnsembleBody`), its member with the largest
    weight and that member's name; None for any other model. A class activation map needs one
    spatial map, and the ensemble's members each have their own."""
    body = getattr(model, "body", None)
    if not isinstance(body, EnsembleBody):
        return None
    log_weights = getattr(getattr(model, "head", None), "log_weights", None)
    i = int(log_weights.flatten().argmax()) if isinstance(log_weights, torch.Tensor) else 0
    return f"body.members.{i}", body.members[i]


def resolve_layer(
    model: nn.Module, target_layer: LayerSpec, input_size: tuple[int, int]
) -> tuple[str, nn.Module]:
    """(name, module) of a layer given by name, as a module, or None for the automatic choice."""
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
