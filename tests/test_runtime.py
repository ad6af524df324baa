"""Feature runtimes: parity with PyTorch per engine, export caching, fallbacks."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from transferlab import runtime
from transferlab.backbones import Backbone, create_backbone
from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess
from transferlab.runtime import EngineFallbackWarning, FeatureRuntime, make_runtime
from transferlab.runtime.engines import OnnxRuntime

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MNV2 = SHARED / "weights" / "mobilenetv2_100.tf_quant_in1k"
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)  # default engine threads


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=0).eval()
    return Backbone(
        spec="mobilenetv2_050",
        model=model,
        preprocess=Preprocess(input_size=(SIZE, SIZE), mean=MEAN, std=STD),
        num_features=model.num_features,
        weights_hash="random-init-test",
        pretrained=False,
    )


def _images(n: int, size: int = SIZE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _torch_features(bb: Backbone, images: np.ndarray) -> np.ndarray:
    """The reference, written independently of runtime.py: normalize in float, then forward."""
    x = torch.from_numpy(images).float() / 255.0
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return bb.model((x - mean) / std).numpy()


ENGINES = [
    "torch",
    "onnxruntime",
    pytest.param(
        "openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_torch(tiny, engine, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)  # no silent fallback allowed here
        rt = make_runtime(tiny, engine=engine, export_dir=tmp_path, threads=1)
    assert isinstance(rt, FeatureRuntime) and rt.engine == engine
    images = _images(5)
    out = rt(images)
    assert out.dtype == np.float32 and out.shape == (5, tiny.num_features)
    np.testing.assert_allclose(out, _torch_features(tiny, images), atol=1e-4, rtol=0)
    assert rt.parity is not None and rt.parity <= 1e-4


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_splits_large_batches_across_streams(tiny, tmp_path):
    rt = make_runtime(tiny, engine="openvino", export_dir=tmp_path, threads=2)
    assert rt.streams >= 2  # OpenVINO's throughput compilation: one stream per thread here
    images = _images(2 * rt.streams + 1, seed=3)  # uneven parts
    bulk = rt(images)
    singles = np.concatenate([rt(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(bulk, _torch_features(tiny, images), atol=1e-4, rtol=0)
    np.testing.assert_allclose(bulk, singles, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "engine",
    [
        "torch",
        pytest.param(
            "openvino",
            marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed"),
        ),
    ],
)
def test_map_gives_each_batch_its_features_in_order(tiny, engine, tmp_path):
    """OpenVINO's map runs small requests on its streams concurrently: outputs still come in
    the batches' order, a batch past the chunk size (torch: max_batch, OpenVINO:
    REQUEST_IMAGES) is cut and joined, an empty batch is empty, and a consumer that stops early
    leaves the runtime usable."""
    rt = make_runtime(tiny, engine=engine, export_dir=tmp_path, threads=2)
    rt.max_batch = 4
    sizes = [3, 1, 0, 9, 2, 5, 4]  # 9 and 5: two and three chunks
    batches = [_images(n, seed=10 + i) for i, n in enumerate(sizes)]
    outs = list(rt.map(iter(batches)))
    assert [len(o) for o in outs] == sizes
    for images, out in zip(batches, outs, strict=True):
        np.testing.assert_allclose(out, rt(images), atol=1e-5, rtol=0)
    # batches that only the runtime holds while their requests read them in place
    fresh = list(rt.map(_images(n, seed=10 + i) for i, n in enumerate(sizes)))
    for out, again in zip(outs, fresh, strict=True):
        np.testing.assert_allclose(again, out, atol=1e-5, rtol=0)
    first = next(rt.map(iter(batches)))  # abandoned with requests in flight
    np.testing.assert_allclose(first, outs[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(rt(batches[3]), outs[3], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects uint8"):
        list(rt.map(iter([batches[0].astype(np.float32)])))


def test_a_body_that_cannot_be_built_fails_as_itself_and_keeps_the_export(tiny, tmp_path):
    """The network is built before any engine: its error is the user's message, not three
    engine fallbacks that would also delete the (valid) cached export of its identity."""
    export = tmp_path / f"{tiny.identity_hash()}.onnx"
    export.write_bytes(b"a valid export, as far as this test knows")

    def broken() -> torch.nn.Module:
        raise TransferlabError("run/body.safetensors: weights do not fit the network")

    lazy = tiny.replace(model=None, build=broken, arch=tiny.arch)
    assert lazy.identity_hash() == tiny.identity_hash()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        with pytest.raises(TransferlabError, match="weights do not fit"):
            make_runtime(lazy, export_dir=tmp_path)
    assert export.is_file()


def test_auto_prefers_openvino_then_onnxruntime(tiny, tmp_path):
    rt = make_runtime(tiny, export_dir=tmp_path)
    assert rt.engine == ("openvino" if HAS_OPENVINO else "onnxruntime")
    assert (tmp_path / f"{tiny.identity_hash()}.onnx").is_file()


def test_export_is_cached_and_reused(tiny, tmp_path, monkeypatch):
    messages: list[str] = []
    first = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path, log=messages.append)
    path = tmp_path / f"{tiny.identity_hash()}.onnx"
    assert first.export_path == path and first.export_seconds is not None
    assert any("exporting" in m for m in messages)
    mtime = path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported although a cached export exists")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    second = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path)
    assert second.engine == "onnxruntime" and second.export_seconds is None
    assert path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".tmp-*"))


def test_default_export_dir_is_cache_exports(tiny, tmp_path):
    rt = make_runtime(tiny, engine="onnxruntime")
    assert rt.export_path == tmp_path / "cache" / "exports" / f"{tiny.identity_hash()}.onnx"


def test_failing_export_falls_back_to_torch_with_one_warning(tiny, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtime, "export_onnx", broken)
    with pytest.warns(EngineFallbackWarning) as record:
        rt = make_runtime(tiny, engine="auto", export_dir=tmp_path)
    assert rt.engine == "torch"
    msgs = [str(w.message) for w in record if issubclass(w.category, EngineFallbackWarning)]
    assert len(msgs) == 1 and "exporter exploded" in msgs[0] and "torch" in msgs[0]
    images = _images(2)
    np.testing.assert_allclose(rt(images), _torch_features(tiny, images), atol=1e-4, rtol=0)


def test_parity_failure_falls_back(tiny, tmp_path, monkeypatch):
    real_run = OnnxRuntime._run
    monkeypatch.setattr(OnnxRuntime, "_run", lambda self, x: real_run(self, x) + 1e-2)
    with pytest.warns(EngineFallbackWarning, match="differ from torch"):
        rt = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path)
    assert rt.engine == "torch"


def test_stale_cached_export_is_replaced(tiny, tmp_path):
    path = tmp_path / f"{tiny.identity_hash()}.onnx"
    path.write_bytes(b"not an onnx file")  # e.g. left by an older version or a crash
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        rt = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path)
    assert rt.engine == "onnxruntime" and rt.export_seconds is not None
    assert path.stat().st_size > 1000


def test_runtime_chunks_validates_and_handles_empty(tiny, tmp_path):
    rt = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path)
    rt.max_batch = 2  # force several chunks
    images = _images(5)
    np.testing.assert_allclose(rt(images), _torch_features(tiny, images), atol=1e-4, rtol=0)
    assert rt(images[:0]).shape == (0, tiny.num_features)
    with pytest.raises(ValueError, match="uint8"):
        rt(images.astype(np.float32))
    with pytest.raises(ValueError, match=f"\\(n, 3, {SIZE}, {SIZE}\\)"):
        rt(_images(1, size=SIZE + 1))


def test_unknown_engine_is_a_user_error(tiny):
    with pytest.raises(TransferlabError, match="--engine"):
        make_runtime(tiny, engine="tensorrt")


def test_runtime_leaves_callers_model_alone(tiny, tmp_path):
    fmt_before = next(tiny.model.parameters()).is_contiguous()
    rt = make_runtime(tiny, engine="torch")
    assert rt.malloc_tuned in (True, False)
    assert next(tiny.model.parameters()).is_contiguous() == fmt_before  # no channels_last leak
    # Mid-training callers: features are computed in eval mode, and train mode is restored.
    tiny.model.train()
    try:
        rt = make_runtime(tiny, engine="onnxruntime", export_dir=tmp_path)
        assert tiny.model.training and all(m.training for m in tiny.model.modules())
        images = _images(3)
        tiny.model.eval()
        np.testing.assert_allclose(rt(images), _torch_features(tiny, images), atol=1e-4, rtol=0)
    finally:
        tiny.model.eval()


@pytest.fixture(scope="module")
def shared_mnv2(tmp_path_factory) -> tuple[Backbone, Path]:
    if not (SHARED_MNV2 / "config.json").is_file():
        pytest.skip(f"shared weights not found at {SHARED_MNV2}")
    return create_backbone(f"local-dir:{SHARED_MNV2}"), tmp_path_factory.mktemp("exports")


_OUT_OF_ORDER = """
import gc, os, signal, sys
import numpy as np, timm, torch
from pathlib import Path
from transferlab.backbones import Backbone
from transferlab.preprocess import Preprocess
from transferlab.runtime import make_runtime

torch.manual_seed(0)
m = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=0).eval()
pre = Preprocess(input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
bb = Backbone("mobilenetv2_050", m, pre, m.num_features, "random-init-test", False)
x = np.zeros((2, 3, 32, 32), np.uint8)
a = make_runtime(bb, engine="openvino", export_dir=Path(sys.argv[1]))
b = make_runtime(bb, engine="openvino", export_dir=Path(sys.argv[1]))
assert a.engine == b.engine == "openvino"
a(x), b(x)
del a; gc.collect()
del b; gc.collect()
ran = []
signal.signal(signal.SIGUSR2, lambda *_: ran.append(1))
os.kill(os.getpid(), signal.SIGUSR2)  # a handled signal, like SIGCHLD from a decode worker
print("handled" if ran else "not handled")
"""


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_models_freed_out_of_order_keep_signals_deliverable(tmp_path):
    # OpenVINO swaps the compiling thread's signal stack and restores a freed one when models
    # die out of order; the next handled signal then killed the process (SIGSEGV, see
    # runtime.openvino_engine.keep_signal_stack). Run in a child: the failure mode is a crash.
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _OUT_OF_ORDER, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip().endswith("handled")
    assert "not handled" not in r.stdout


@pytest.mark.shared
@pytest.mark.parametrize("engine", ENGINES[1:])
def test_shared_mobilenetv2_engines_match_torch(shared_mnv2, engine):
    bb, export_dir = shared_mnv2  # one export shared by both engines
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    assert bb.preprocess.input_size == (224, 224) and bb.num_features == 1280
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        rt = make_runtime(bb, engine=engine, export_dir=export_dir, threads=1)
    assert rt.engine == engine
    images = _images(4, size=224, seed=2)
    np.testing.assert_allclose(rt(images), _torch_features(bb, images), atol=1e-4, rtol=0)
