"""Where the model looks: class activation maps of its worst mistakes and its most confident
correct images."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data.images import load_image
from transferlab.evaluation import analysis
from transferlab.evaluation.report.context import RunContext
from transferlab.evaluation.report.render import CAM_PX, jpeg_uri
from transferlab.runs import SavedModel
from transferlab.storage import code_digest, state_digest


def _chosen(
    probs: np.ndarray, labels: np.ndarray, paths: list[str], n: int
) -> tuple[list[int], int]:
    """Up to ``n`` images: the ``n // 2`` worst mistakes, then the most confident correct ones;
    and how many of them are mistakes."""
    wrong = [r["index"] for r in analysis.top_losses(probs, labels, paths, n // 2)]
    right = np.flatnonzero(probs.argmax(axis=1) == labels)
    right = right[np.argsort(-probs[right].max(axis=1), kind="stable")]
    return wrong + [int(i) for i in right[: n - len(wrong)]], len(wrong)


def _pair(image: np.ndarray, cam: np.ndarray) -> str:
    """The image beside its heatmap overlay, as an embedded JPEG ``CAM_PX`` per half wide."""
    from transferlab.evaluation import explain

    pair = np.concatenate([image.transpose(1, 2, 0), explain.overlay_cam(image, cam)], axis=1)
    img = Image.fromarray(pair)
    img = img.resize((2 * CAM_PX, round(CAM_PX * pair.shape[0] / pair.shape[1] * 2)))
    return jpeg_uri(np.asarray(img))


def _cam_pairs(saved: SavedModel, paths: list[str]) -> dict[str, Any]:
    """Image | CAM pictures of ``paths`` for the predicted classes, and the layer explained."""
    from transferlab.evaluation import explain  # matplotlib and timm: only when drawing

    pre = saved.preprocess
    size = (int(pre.input_size[0]), int(pre.input_size[1]))
    images = np.stack([load_image(p, pre) for p in paths])
    # The layer choice traces one dummy forward pass: at the model's own input size, the only
    # one a fixed-size model (the scratch CNNs: Flatten + Dense) can take.
    layer, _ = explain.find_target_layer(saved.net, size)
    x = explain.normalize(images, pre.mean, pre.std)
    cams, used = explain.grad_cam(saved.net, x, target_layer=layer, input_size=size)
    return {
        "layer": layer,
        "stride": explain.DEFAULT_CAM_STRIDE,
        "pairs": [_pair(images[j], cams[j]) for j in range(len(paths))],
        "used": [int(u) for u in used],
    }


def gradcam_section(ctx: RunContext, n: int) -> dict[str, Any]:
    """The ``gradcam.html`` section: image | HiResCAM pairs for ``n`` images of the detailed
    split; kept in the cache by what they depend on (the network's weights, the images, the
    code), so an unchanged run's report neither builds the network nor runs it."""
    name = ctx.eval_split()
    split = ctx.splits()[name]
    probs = ctx.probs(name)
    pred = probs.argmax(axis=1)
    chosen, n_wrong = _chosen(probs, split.labels, split.paths, n)
    data: dict[str, Any] = {"name": name, "items": [], "n_wrong": n_wrong}
    if not chosen:
        return data
    saved = ctx.clf.saved
    paths = [split.paths[i] for i in chosen]
    key = (
        "gradcam", saved.body, state_digest(saved.head_net), saved.preprocess.to_dict(),
        [split.digests[i] for i in chosen], CAM_PX, _code(),
    )  # fmt: skip
    got = ctx.cached(key, lambda: _cam_pairs(saved, paths))
    for j, i in enumerate(chosen):
        src = Path(split.paths[i]).name
        data["items"].append(
            {
                "src": got["pairs"][j],
                "alt": f"CAM {src}",
                "name": src,
                "true": ctx.classes[split.labels[i]],
                "pred": ctx.classes[pred[i]],
                "ok": bool(pred[i] == split.labels[i]),
                "p": probs[i, pred[i]],
                "cam_class": ctx.classes[got["used"][j]],
            }
        )
    data.update(layer=got["layer"], stride=got["stride"])
    return data


@functools.cache
def _code() -> str:
    explain_dir = Path(__file__).parents[1] / "explain"
    return code_digest(__file__, *sorted(explain_dir.glob("*.py")))
