"""Heads on synthetic features: learning, sklearn agreement, L2 selection, determinism, rebuild."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.nn import functional as F

from transferlab.errors import TransferlabError
from transferlab.heads import DEFAULT_L2, HEADS, L2_GRID, FittedHead, build_head, fit_head

# Small MLP settings keep the suite fast on 2 shared cores; the default architecture is checked
# separately by shape.
SMALL_MLP = {"hidden": (64, 64), "max_epochs": 40, "batch_size": 32}


def blobs(n: int, d: int, c: int, *, sep: float, seed: int, noise: float = 1.0):
    """Gaussian blobs with class centres ``sep`` apart (roughly), balanced classes."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1000 + c * 7 + d).standard_normal((c, d))
    centres *= sep / np.sqrt(2 * d)
    y = np.arange(n) % c
    rng.shuffle(y)
    x = centres[y] + noise * rng.standard_normal((n, d))
    # an offset and uneven scales, as real pooled features have, so standardization matters
    x = x * np.linspace(0.5, 3.0, d) + 5.0
    return x.astype(np.float32), y.astype(np.int64)


def val_accuracy(head: FittedHead, x: np.ndarray, y: np.ndarray) -> float:
    return float((head.predict_logits(x).argmax(1) == y).mean())


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("num_classes", [2, 5])
def test_head_learns_separable_problem(kind, num_classes):
    x, y = blobs(400, 32, num_classes, sep=8.0, seed=1)
    xv, yv = blobs(200, 32, num_classes, sep=8.0, seed=2)
    opts = SMALL_MLP if kind == "mlp" else {}
    head = fit_head(kind, x, y, xv, yv, num_classes=num_classes, **opts)
    assert val_accuracy(head, xv, yv) >= 0.95
    logits = head.module(torch.from_numpy(xv))
    assert logits.shape == (len(xv), num_classes)  # logits for every class, also for C = 2
    assert head.spec["kind"] == kind and head.spec["num_classes"] == num_classes
    assert not head.module.training


@pytest.mark.parametrize("num_classes", [2, 5])
def test_linear_matches_sklearn_logistic_regression(num_classes):
    x, y = blobs(400, 20, num_classes, sep=3.0, seed=3)  # overlapping: finite optimum
    xt, _ = blobs(300, 20, num_classes, sep=3.0, seed=4)
    l2 = 1e-2
    head = fit_head("linear", x, y, None, None, num_classes=num_classes, l2=l2)

    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    # Our penalty is l2/2 * ||W||^2 on the mean loss, i.e. sklearn's C = 1 / (l2 * n). sklearn's
    # binary model has one weight vector w = w1 - w0; the symmetric multinomial optimum has
    # w1 = -w0 = w / 2, so its penalty is l2/4 * ||w||^2, i.e. C = 2 / (l2 * n).
    c_sk = (2.0 if num_classes == 2 else 1.0) / (l2 * len(x))
    sk = LogisticRegression(C=c_sk, tol=1e-10, max_iter=10_000)
    sk.fit((x - mean) / std, y)

    ours = torch.softmax(torch.from_numpy(head.predict_logits(xt)).double(), 1).numpy()
    theirs = sk.predict_proba((xt - mean) / std)
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.98
    np.testing.assert_allclose(ours, theirs, atol=1e-3)  # float32 L-BFGS: measured ~2e-4


def test_grid_picks_stronger_l2_for_tiny_noisy_train_than_for_large():
    def noisy(n, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 40)).astype(np.float32)
        score = x[:, 0] + 0.5 * x[:, 1]  # 2 informative of 40 dims
        y = (score + 1.5 * rng.standard_normal(n) > 0).astype(np.int64)
        return x, y

    xv, yv = noisy(600, 10)
    tiny = fit_head("linear", *noisy(24, 11), xv, yv, num_classes=2)
    large = fit_head("linear", *noisy(3000, 12), xv, yv, num_classes=2)
    assert tiny.spec["l2"] > large.spec["l2"]
    assert tiny.spec["l2_source"] == "val"

    for head in (tiny, large):
        rows = head.history
        assert [r["l2"] for r in rows] == sorted(L2_GRID, reverse=True)
        assert sum(r["selected"] for r in rows) == 1
        chosen = next(r for r in rows if r["selected"])
        assert chosen["l2"] == head.spec["l2"]
        assert chosen["val_loss"] == pytest.approx(min(r["val_loss"] for r in rows), abs=1e-6)
        # the returned weights are those of the chosen grid row
        logits = torch.from_numpy(head.predict_logits(xv)).double()
        assert float(F.cross_entropy(logits, torch.from_numpy(yv))) == pytest.approx(
            chosen["val_loss"], abs=1e-4
        )


def test_linear_without_validation_uses_default_strength():
    x, y = blobs(120, 8, 3, sep=4.0, seed=5)
    head = fit_head("linear", x, y, None, None, num_classes=3)
    assert head.spec["l2"] == DEFAULT_L2 and head.spec["l2_source"] == "default"
    assert len(head.history) == 1 and head.history[0]["val_loss"] is None


@pytest.mark.parametrize("kind", HEADS)
def test_fit_is_deterministic_and_seed_matters(kind):
    x, y = blobs(200, 16, 3, sep=3.0, seed=6)
    xv, yv = blobs(100, 16, 3, sep=3.0, seed=7)
    opts = {**SMALL_MLP, "max_epochs": 8} if kind == "mlp" else {}
    a = fit_head(kind, x, y, xv, yv, num_classes=3, seed=1, **opts)
    b = fit_head(kind, x, y, xv, yv, num_classes=3, seed=1, **opts)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b.history and a.spec == b.spec
    if kind == "mlp":  # the seed drives init, shuffling and dropout
        c = fit_head(kind, x, y, xv, yv, num_classes=3, seed=2, **opts)
        assert not torch.equal(sa["net.0.weight"], c.module.state_dict()["net.0.weight"])


def test_fit_leaves_global_torch_state_alone():
    x, y = blobs(60, 4, 2, sep=4.0, seed=8)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_head("mlp", x, y, x, y, num_classes=2, seed=5, hidden=(8,), max_epochs=2)
    assert torch.equal(torch.rand(3), expected)  # init/dropout used a private RNG stream
    assert torch.get_num_threads() == threads  # the 1-thread fit restored the setting


@pytest.mark.parametrize("kind", HEADS)
def test_class_weight_auto_raises_minority_recall(kind):
    rng = np.random.default_rng(9)
    shift = np.array([1.2, 0, 0, 0, 0, 0])

    def sample(n0, n1):
        x = np.concatenate([rng.normal(0.0, 1.0, (n0, 6)), rng.normal(0.0, 1.0, (n1, 6)) + shift])
        return x.astype(np.float32), np.r_[np.zeros(n0), np.ones(n1)].astype(np.int64)

    x, y = sample(600, 30)  # 20:1 imbalance, overlapping classes
    xt, yt = sample(500, 500)
    opts = {"hidden": (32,), "max_epochs": 15} if kind == "mlp" else {}
    plain = fit_head(kind, x, y, None, None, num_classes=2, **opts)
    weighted = fit_head(kind, x, y, None, None, num_classes=2, class_weight="auto", **opts)

    def minority_recall(head):
        return float((head.predict_logits(xt)[yt == 1].argmax(1) == 1).mean())

    assert minority_recall(weighted) > minority_recall(plain) + 0.2
    assert weighted.spec["class_weight"] == "auto"
    np.testing.assert_allclose(weighted.spec["class_weights"], [630 / (2 * 600), 630 / (2 * 30)])


@pytest.mark.parametrize("kind", HEADS)
def test_build_head_from_spec_reproduces_outputs(kind):
    x, y = blobs(150, 12, 4, sep=4.0, seed=13)
    opts = {"hidden": (16, 8), "dropout": 0.1, "max_epochs": 5} if kind == "mlp" else {}
    head = fit_head(kind, x, y, x[:50], y[:50], num_classes=4, **opts)
    spec = json.loads(json.dumps(head.spec))  # the spec must survive JSON
    rebuilt = build_head(spec)
    rebuilt.load_state_dict(head.module.state_dict())  # strict: same keys and shapes
    rebuilt.eval()
    xt = torch.from_numpy(x[50:])
    with torch.no_grad():
        assert torch.equal(rebuilt(xt), head.module(xt))
    # standardization travels as buffers, not in the spec
    sd = head.module.state_dict()
    np.testing.assert_allclose(sd["standardize.mean"].numpy(), x.mean(0), rtol=1e-5)


def test_default_mlp_architecture_is_the_tutorial_head():
    spec = {"kind": "mlp", "in_features": 1280, "num_classes": 3, "hidden": [512, 512]}
    module = build_head({**spec, "dropout": 0.3})
    layers = list(module.net)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if hasattr(m, "in_features")] == [
        (1280, 512),
        (512, 512),
        (512, 3),
    ]
    assert layers[2].p == 0.3


def test_mlp_early_stopping_restores_best_weights():
    # Few, noisy samples and a roomy net: val loss bottoms out early, then rises (overfitting).
    rng = np.random.default_rng(14)
    x = rng.standard_normal((80, 30)).astype(np.float32)
    y = ((x[:, 0] + rng.standard_normal(80)) > 0).astype(np.int64)
    xv = rng.standard_normal((200, 30)).astype(np.float32)
    yv = ((xv[:, 0] + rng.standard_normal(200)) > 0).astype(np.int64)
    head = fit_head(
        "mlp", x, y, xv, yv, num_classes=2, hidden=(128,), dropout=0.0, patience=5, max_epochs=200
    )
    spec, hist = head.spec, head.history
    assert spec["early_stopped"] and spec["epochs_run"] < 200
    val_losses = [r["val_loss"] for r in hist]
    best = int(np.argmin(val_losses))
    assert spec["best_epoch"] == best + 1
    assert len(hist) == best + 1 + 5  # stopped after `patience` epochs without improvement
    assert val_losses[-1] > val_losses[best]
    logits = torch.from_numpy(head.predict_logits(xv))
    returned = float(F.cross_entropy(logits, torch.from_numpy(yv)))
    assert returned == pytest.approx(min(val_losses), abs=1e-6)
    assert set(hist[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}


def test_user_mistakes_raise_transferlab_error():
    x, y = blobs(40, 5, 3, sep=4.0, seed=15)
    with pytest.raises(TransferlabError, match="linear, mlp"):
        fit_head("svm", x, y, None, None, num_classes=3)
    with pytest.raises(TransferlabError, match=r"\[3\] have no training examples"):
        fit_head("linear", x, y, None, None, num_classes=4)
    with pytest.raises(TransferlabError, match="one label per feature row"):
        fit_head("linear", x, y[:-1], None, None, num_classes=3)
    with pytest.raises(TransferlabError, match="2-D"):
        fit_head("linear", x[:, 0], y, None, None, num_classes=3)
    with pytest.raises(TransferlabError, match="x_val has 4 features"):
        fit_head("linear", x, y, x[:, :4], y, num_classes=3)
    with pytest.raises(TransferlabError, match="both x_val and y_val"):
        fit_head("linear", x, y, x, None, num_classes=3)
    with pytest.raises(TransferlabError, match="outside 0..2"):
        fit_head("linear", x, y + 1, None, None, num_classes=3)
    with pytest.raises(TransferlabError, match="NaN"):
        fit_head("linear", np.full_like(x, np.nan), y, None, None, num_classes=3)
    with pytest.raises(TransferlabError, match="unknown option"):
        fit_head("linear", x, y, None, None, num_classes=3, hiden=(4,))
    with pytest.raises(TransferlabError, match="class_weight"):
        fit_head("linear", x, y, None, None, num_classes=3, class_weight="inverse")
    with pytest.raises(TransferlabError, match="kind"):
        build_head({"kind": "tree", "in_features": 3, "num_classes": 2})


def _memmap(path, x: np.ndarray) -> np.ndarray:
    """``x`` written to an .npy file and opened again read-only (as a large feature matrix is)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
    out[:] = x
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def test_minibatch_linear_on_a_memmap_is_as_accurate_as_lbfgs(tmp_path):
    x, y = blobs(6000, 48, 3, sep=3.0, seed=21)  # overlapping classes: accuracy ~0.9, not 1
    xv, yv = blobs(2000, 48, 3, sep=3.0, seed=22)
    xm = _memmap(tmp_path / "x.npy", x)
    opts = {"l2_grid": (1e-1, 1e-2, 1e-3)}
    exact = fit_head("linear", x, y, xv, yv, num_classes=3, solver="lbfgs", **opts)
    opts_mb = {**opts, "solver": "minibatch", "epochs": 4, "batch_size": 256}
    fast = fit_head("linear", xm, y, xv, yv, num_classes=3, **opts_mb)
    assert exact.spec["solver"] == "lbfgs" and fast.spec["solver"] == "minibatch"
    assert val_accuracy(exact, xv, yv) > 0.8
    assert abs(val_accuracy(fast, xv, yv) - val_accuracy(exact, xv, yv)) <= 0.01
    chosen = next(r for r in fast.history if r["selected"])
    assert chosen["val_loss"] == pytest.approx(min(r["val_loss"] for r in fast.history))
    assert chosen["val_loss"] < exact.history[0]["val_loss"] + 0.02  # near the exact optimum
    again = fit_head("linear", xm, y, xv, yv, num_classes=3, **opts_mb)
    assert torch.equal(again.module.net.weight, fast.module.net.weight)  # seeded


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("solver", ["lbfgs", "minibatch"])
def test_fit_on_a_memmap_makes_no_copy_of_the_matrix(tmp_path, solver):
    x, y = blobs(80_000, 256, 2, sep=3.0, seed=23)
    xm = _memmap(tmp_path / "x.npy", x)
    size = x.nbytes  # 82 MB
    del x
    opts = {"l2": 1e-2, "max_iter": 10} if solver == "lbfgs" else {"l2": 1e-2, "epochs": 1}
    # first-call costs (lazy imports, thread pools, allocator arenas: ~100 MB) are not the data's
    fit_head("linear", xm[:500], y[:500], None, None, num_classes=2, solver=solver, **opts)
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    before = _rss_kib("VmRSS")
    head = fit_head("linear", xm, y, None, None, num_classes=2, solver=solver, **opts)
    growth = (_rss_kib("VmHWM") - before) * 1024
    # Reading the memmap maps its pages (one matrix size, page cache) and the chunked statistics
    # take 8 MB; a float64 copy would add two more matrix sizes, a float32 copy one.
    assert growth < 1.6 * size, f"peak grew by {growth / size:.2f}x the matrix"
    assert val_accuracy(head, xm[:2000], y[:2000]) > 0.9
