"""Does Grad-CAM point at the pixels the classifier actually uses? A deletion test.

Setup: the shared ImageNet MobileNetV2 body (frozen, BN in eval mode) + a logistic-regression
head fitted with LBFGS on the train split's pooled features (a stand-in for transferlab.fit).
On ``--n`` test images, for each image and its predicted class c:

* ``gradcam``   blank the 20% of pixels with the highest Grad-CAM (trained model) for c;
* ``random``    blank 20% of pixels chosen uniformly at random;
* ``random_backbone``  blank the top 20% of a Grad-CAM computed by a *randomly initialised*
  MobileNetV2 (same architecture and padding, ``pretrained=False``, seed fixed) with its own
  logistic head fitted the same way on its own features, explaining the same class c;
* extra controls with a CAM's shape statistics but no knowledge of the image:
  ``random_blobs`` (top 20% of a random map drawn at the CAM's 7x7 resolution and upsampled
  bilinearly like a CAM) and ``shuffled_gradcam`` (the trained model's Grad-CAM of a
  *different* test image).

"Blank" = set to the per-channel dataset mean, i.e. 0 after normalization. Every mask is
scored on the *trained* model, so the four numbers are drops of the same probability
p(c | image) and directly comparable. Grad-CAM is honest here only if its drop beats random
pixels *and* the random-backbone map (a map that only knows image statistics such as edges
and contrast) *and* the blob controls (contiguous regions in the wrong place). Scattered
random pixels are a harsh baseline: 20% salt-and-pepper noise is far from anything the
network saw in training, so it can hurt as much as removing the object's best part.

Run from the repository root:  .venv/bin/python benchmarks/gradcam_deletion.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from transferlab.evaluation.explain import feature_maps, find_target_layer, grad_cam, normalize

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class Net(nn.Module):
    """The transferlab classifier contract: ``logits = head(body(x))``."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60, help="test images (half per class)")
    p.add_argument("--data", default="../shared/datasets/cats_vs_dogs_small")
    p.add_argument(
        "--backbone", default="local-dir:../shared/weights/mobilenetv2_100.tf_quant_in1k"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.2, help="share of pixels blanked")
    p.add_argument(
        "--train-per-class",
        type=int,
        default=0,
        help="train images per class for the heads (0 = all)",
    )
    p.add_argument("--batch", type=int, default=20)
    return p.parse_args(argv)


def list_split(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(ci)
    return paths, labels, classes


def pil_part(transform) -> object:
    """timm's eval transform up to (not including) ToTensor: resize + centre crop, in PIL."""
    steps = []
    for t in transform.transforms:
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    return lambda im: _compose(steps, im)


def _compose(steps: list, im: Image.Image) -> Image.Image:
    for t in steps:
        im = t(im)
    return im


def decode(paths: list[Path], to_pil) -> np.ndarray:
    """Decode each file once into uint8 (n, 3, H, W)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(to_pil(im.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1))
    return np.stack(out)


@torch.inference_mode()
def features(body: nn.Module, imgs: np.ndarray, mean, std, batch: int, fmt) -> torch.Tensor:
    chunks = [
        body(normalize(imgs[i : i + batch], mean, std).contiguous(memory_format=fmt))
        for i in range(0, len(imgs), batch)
    ]
    return torch.cat(chunks).float()


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3) -> nn.Linear:
    """Multinomial logistic regression (LBFGS) on standardized features; the standardization
    is folded into the returned Linear so it reads raw pooled features."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    lin = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(z), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(lin.weight / sd)
        head.bias.copy_(lin.bias - (lin.weight * (mu / sd)).sum(1))
    return head.eval().requires_grad_(False)


def top_mask(cams: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """True on the ``fraction`` highest-CAM pixels of each map.

    Ties (CAMs are ReLU'd, so often many exact zeros) are broken at random: a plain argsort
    would fill the quota with the top-left corner and bias the test.
    """
    n, h, w = cams.shape
    k = round(fraction * h * w)
    jitter = rng.random(cams.shape, dtype=np.float32) * 1e-6
    flat = (cams + jitter).reshape(n, -1)
    idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    mask = np.zeros((n, h * w), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask.reshape(n, h, w)


def random_mask(n: int, h: int, w: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    return top_mask(np.zeros((n, h, w), np.float32), fraction, rng)  # jitter only = uniform


def random_blob_mask(
    n: int, h: int, w: int, grid: tuple[int, int], fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Top ``fraction`` of a random map drawn at the CAM's own resolution and upsampled the
    same way (bilinear): random *location*, but Grad-CAM's granularity and smoothness."""
    low = torch.from_numpy(rng.random((n, 1, *grid), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return top_mask(up[:, 0].numpy(), fraction, rng)


@torch.inference_mode()
def scores(model: nn.Module, x: torch.Tensor, classes: np.ndarray, batch: int):
    """(p(c), logit margin z_c - max_{j != c} z_j) per image.

    The margin is reported next to the probability because a confident head saturates the
    softmax (p = 0.999 barely moves until the evidence is almost gone)."""
    z = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).float()
    c = torch.as_tensor(classes)
    rows = torch.arange(len(z))
    p = torch.softmax(z, 1)[rows, c]
    others = z.clone()
    others[rows, c] = -torch.inf
    return p.numpy(), (z[rows, c] - others.max(1).values).numpy()


def blank(x: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    # 0 in normalized space == the per-channel mean: "no information" rather than black.
    return x.masked_fill(torch.from_numpy(mask)[:, None], 0.0)


def cams_in_batches(model, x, batch, target_class=None) -> tuple[np.ndarray, np.ndarray]:
    cams, classes = [], []
    for i in range(0, len(x), batch):
        tc = None if target_class is None else target_class[i : i + batch]
        c, k = grad_cam(model, x[i : i + batch], target_class=tc)
        cams.append(c)
        classes.append(k)
    return np.concatenate(cams), np.concatenate(classes)


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / np.sqrt(len(v)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = Path(args.data)
    # channels_last: ~1.7x faster for MobileNet on CPU (shared/weights/MANIFEST.md), same maths.
    cl = torch.channels_last

    body = timm.create_model(args.backbone, pretrained=True, num_classes=0).eval()
    body = body.requires_grad_(False).to(memory_format=cl)
    cfg = resolve_model_data_config(body)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    to_pil = pil_part(create_transform(**cfg, is_training=False))

    train_paths, train_labels, classes = list_split(data / "train")
    if args.train_per_class:
        keep = []
        for c in range(len(classes)):
            idx = [i for i, y in enumerate(train_labels) if y == c]
            keep += list(rng.permutation(idx)[: args.train_per_class])
        train_paths = [train_paths[i] for i in sorted(keep)]
        train_labels = [train_labels[i] for i in sorted(keep)]
    test_paths, test_labels, test_classes = list_split(data / "test")
    if test_classes != classes:
        raise SystemExit(f"train classes {classes} != test classes {test_classes}")
    chosen = []
    for c in range(len(classes)):  # balanced, seeded sample of the test split
        idx = [i for i, y in enumerate(test_labels) if y == c]
        per = args.n // len(classes) + (1 if c < args.n % len(classes) else 0)
        chosen += list(rng.permutation(idx)[:per])
    test_paths = [test_paths[i] for i in chosen]
    y_test = np.array([test_labels[i] for i in chosen])

    train_u8 = decode(train_paths, to_pil)  # each file decoded exactly once
    test_u8 = decode(test_paths, to_pil)
    y_train = torch.tensor(train_labels)
    print(
        f"decoded {len(train_u8)} train + {len(test_u8)} test images "
        f"({test_u8.shape[2]}x{test_u8.shape[3]}) in {time.perf_counter() - t0:.1f}s"
    )

    head = fit_logreg(features(body, train_u8, mean, std, 32, cl), y_train, len(classes))
    trained = Net(body, head).eval()
    # Same architecture and pad_type (local-dir applies the folder's model_args), no weights;
    # its own head, fitted exactly like the trained one on its own features.
    torch.manual_seed(args.seed)
    rbody = timm.create_model(args.backbone, pretrained=False, num_classes=0).eval()
    rbody = rbody.requires_grad_(False).to(memory_format=cl)
    rhead = fit_logreg(features(rbody, train_u8, mean, std, 32, cl), y_train, len(classes))
    random_net = Net(rbody, rhead).eval()
    print(f"heads fitted at {time.perf_counter() - t0:.1f}s")

    x = normalize(test_u8, mean, std).contiguous(memory_format=cl)
    n, _, h, w = x.shape
    layer = find_target_layer(trained, (h, w))[0]
    grid = feature_maps(trained, x[:1], stages=[layer])[layer].shape[1:]
    cam_trained, cls = cams_in_batches(trained, x, args.batch)
    cam_random, _ = cams_in_batches(random_net, x, args.batch, target_class=cls)
    p0, m0 = scores(trained, x, cls, args.batch)
    _, r_pred = scores(random_net, x, y_test, args.batch)  # margin > 0 <=> correct
    acc, r_acc = float((cls == y_test).mean()), float((r_pred > 0).mean())

    f = args.fraction
    masks = {
        "gradcam": top_mask(cam_trained, f, rng),
        "random": random_mask(n, h, w, f, rng),
        "random_backbone": top_mask(cam_random, f, rng),
        # extra controls, same shape statistics as a CAM but no knowledge of the image:
        "random_blobs": random_blob_mask(n, h, w, grid, f, rng),
        "shuffled_gradcam": top_mask(cam_trained[np.roll(np.arange(n), 1)], f, rng),
    }
    drop_p, drop_m = {}, {}
    for k, mask in masks.items():
        p, m = scores(trained, blank(x, mask), cls, args.batch)
        drop_p[k], drop_m[k] = p0 - p, m0 - m

    print(
        f"\n{n} test images, target layer {layer!r} ({grid[0]}x{grid[1]}), trained-head "
        f"accuracy {acc:.3f} (mean p(pred) {p0.mean():.3f}); random-backbone head accuracy "
        f"{r_acc:.3f}. Blanking {f:.0%} of pixels; drops measured on the trained model for its "
        "predicted class:"
    )
    print(
        f"  {'mask':<17} {'mean dp':>8} {'s.e.':>6} {'median':>7} {'mean dmargin':>12}"
        f"  {'gradcam - mask, dp':>19}  {'gc wins':>7}"
    )
    for k in masks:
        d = drop_p[k]
        line = (
            f"  {k:<17} {d.mean():+8.4f} {_se(d):6.4f} {np.median(d):+7.4f} "
            f"{drop_m[k].mean():+12.3f}"
        )
        if k != "gradcam":
            # Paired over the same images: the honest uncertainty for "beats this control".
            diff = drop_p["gradcam"] - d
            wins = (drop_m["gradcam"] > drop_m[k]).mean()  # margin: no softmax ties at 1.0
            line += f"  {diff.mean():+9.4f} +- {_se(diff):.4f}  {wins:7.0%}"
        print(line)
    g, r, rb = (float(drop_p[k].mean()) for k in ("gradcam", "random", "random_backbone"))
    print(f"\ngradcam_drop         = {g:.4f}")
    print(f"random_drop          = {r:.4f}")
    print(f"random_backbone_drop = {rb:.4f}  (random body + its own fitted head)")
    print(f"gradcam_drop > random_drop:          {g > r}")
    print(f"gradcam_drop > random_backbone_drop: {g > rb}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
