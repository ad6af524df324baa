"""Class activation maps: HiResCAM (default) and Grad-CAM, overlays and one PNG per image.

The model is never modified: the one hook is removed and every module's train/eval flag
restored, also when an error is raised; gradients come from ``autograd.grad``, so no
parameter's ``.grad`` is created.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.evaluation.explain.common import (
    EXPLANATION_FIGSIZE,
    as_uint8_batch,
    check_input_size,
    model_device_dtype,
    new_figure,
    normalize,
    save_figure,
)
from transferlab.evaluation.explain.target_layer import (
    DEFAULT_CAM_METHOD,
    CamMethod,
    LayerSpec,
    resolve_layer,
)
from transferlab.model import eval_mode

TargetClass = int | Sequence[int] | np.ndarray | torch.Tensor | None


def _resolve_classes(
    target_class: TargetClass,
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


def _cam_impl(
    model: nn.Module,
    images: torch.Tensor,
    target_class: TargetClass,
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
    _, _, height, width = images.shape
    check_input_size(height, width, input_size)
    # any layer search traces at the images' own size: the size the model is about to get
    name, layer = resolve_layer(model, target_layer, (height, width))
    device, dtype = model_device_dtype(model)
    # inference_mode(False)/enable_grad: callers often sit inside torch.no_grad() or
    # inference_mode() (prediction code); Grad-CAM needs a graph regardless.
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = images.detach().to(device=device, dtype=dtype).clone()
        act, logits = _forward_capturing(model, x, name, layer)
        classes = _resolve_classes(target_class, logits)
        grads = _class_gradient(logits, classes, act, name)
        with torch.no_grad():
            cam = _combine(grads, act, method, (height, width))
    return (
        cam.cpu().numpy().astype(np.float32),
        classes.cpu().numpy().astype(np.int64),
        logits.detach(),
    )


def _capture_hook(name: str, captured: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A forward hook that keeps the layer's activation as a differentiable leaf."""

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

    return hook


def _forward_capturing(
    model: nn.Module, x: torch.Tensor, name: str, layer: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation of ``layer``, logits) of one forward pass over ``x``."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(_capture_hook(name, captured))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise TransferlabError(f"target layer {name!r} is never run by the model's forward")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
        raise TransferlabError(
            "the model must return logits of shape (n, classes); got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}"
        )
    return captured[-1], logits  # a module run twice: the last call is nearest the output


def _class_gradient(
    logits: torch.Tensor, classes: torch.Tensor, act: torch.Tensor, name: str
) -> torch.Tensor:
    """d(logit of each image's class) / d(activation), one backward pass for the batch."""
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
    return grads


def _combine(
    grads: torch.Tensor, act: torch.Tensor, method: CamMethod, size: tuple[int, int]
) -> torch.Tensor:
    """Gradients and activations -> (n, H, W) maps in [0, 1] at the input size."""
    if method == "gradcam":
        # Grad-CAM: one weight per channel (spatially averaged gradient).
        cam = (grads.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)
    else:
        # HiResCAM: gradient x activation per position; faithful when the head treats
        # positions differently (Grad-CAM's averaged weights cannot express that).
        cam = (grads * act).sum(dim=1)
    cam = F.relu(cam)[:, None].float()
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    # A flat map carries no location information: report zeros, not 0/0.
    return torch.where(span > 1e-12, (cam - lo) / span.clamp_min(1e-12), 0.0)


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
    arr = as_uint8_batch(images_uint8)
    if len(paths) != len(arr):
        raise TransferlabError(f"{len(paths)} paths for {len(arr)} images; give one per image")
    target = _target_indices(target_class, classes, len(arr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used_names: set[str] = set()
    for start in range(0, len(arr), max(1, batch_size)):
        chunk = arr[start : start + batch_size]
        tc = target[start : start + batch_size] if isinstance(target, list) else target
        cams, used, logits = _cam_impl(
            model, normalize(chunk, mean, std), tc, target_layer, method, input_size
        )
        chunk_paths = [Path(p) for p in paths[start : start + len(chunk)]]
        titles = _titles(chunk_paths, logits, used, classes, explained=target is not None)
        for image, cam, src, title in zip(chunk, cams, chunk_paths, titles, strict=True):
            dest = out / _unique_name(src.stem, used_names)
            _save_explanation_png(image, cam, title, dest, method)
            written.append(dest)
    return written


def _target_indices(
    target_class: int | str | Sequence[int] | None, classes: list[str], n: int
) -> int | list[int] | None:
    """A class name becomes its index; a per-image sequence must have one entry per image."""
    if isinstance(target_class, str):
        if target_class not in classes:
            raise TransferlabError(f"unknown class {target_class!r}; classes are {classes}")
        target_class = classes.index(target_class)
    if target_class is not None and not isinstance(target_class, (int, np.integer)):
        target_class = list(target_class)
        if len(target_class) != n:
            raise TransferlabError(f"target_class has {len(target_class)} entries for {n} images")
    return target_class


def _titles(
    paths: list[Path],
    logits: torch.Tensor,
    used: np.ndarray,
    classes: list[str],
    *,
    explained: bool,
) -> list[str]:
    """Per image: its name, the predicted class and, when a class was asked for, that one."""
    if logits.shape[1] != len(classes):
        raise TransferlabError(
            f"the model has {logits.shape[1]} outputs but {len(classes)} class names"
        )
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
    titles = []
    for i, src in enumerate(paths):
        pred = int(probs[i].argmax())
        title = f"{src.name}: predicted {classes[pred]} ({probs[i, pred]:.2f})"
        if explained:
            c = int(used[i])
            title += f"  |  CAM for {classes[c]} ({probs[i, c]:.2f})"
        titles.append(title)
    return titles


def _unique_name(stem: str, used: set[str]) -> str:
    # cat/1.jpg and dog/1.jpg must not overwrite each other's explanation.
    name, k = f"{stem}_gradcam.png", 1
    while name in used:
        name, k = f"{stem}_{k}_gradcam.png", k + 1
    used.add(name)
    return name


_METHOD_NAMES = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}


def _save_explanation_png(
    image: np.ndarray, cam: np.ndarray, title: str, dest: Path, method: str
) -> None:
    fig = new_figure(EXPLANATION_FIGSIZE)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image.transpose(1, 2, 0))
    ax1.set_title("image", fontsize=9)
    ax2.imshow(overlay_cam(image, cam))
    ax2.set_title(f"{_METHOD_NAMES.get(method, method)} (red = most evidence)", fontsize=9)
    for ax in (ax1, ax2):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, dest)
