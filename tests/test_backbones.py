"""Backbone creation, identity, errors, discovery and stages (tiny random models, no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from transferlab.backbones import (
    Backbone,
    BackboneInfo,
    at_input_size,
    create,
    create_backbone,
    hub,
    identity,
    list_backbones,
    search,
    stage_modules,
    with_params,
)
from transferlab.data.images import DECODE_VERSION
from transferlab.errors import TransferlabError

TINY_ARCH = "mobilenetv2_050"


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRANSFERLAB_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user weights list


def make_local_dir(
    folder: Path, *, arch: str = TINY_ARCH, size: int = 64, seed: int = 0, weights: bool = True
) -> Path:
    """A timm local-dir folder (config.json + model.safetensors) holding random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    config = {
        "architecture": arch,
        "num_classes": 10,
        "num_features": model.num_features,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": 10,
            "first_conv": model.pretrained_cfg["first_conv"],
            "classifier": model.pretrained_cfg["classifier"],
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
        )
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_local_dir(tmp_path_factory.mktemp("weights") / "tiny_mnv2")


def test_local_dir_backbone_takes_preprocess_from_config(tiny_dir):
    bb = create_backbone(f"local-dir:{tiny_dir}")
    assert bb.pretrained and not bb.model.training
    assert bb.spec == f"local-dir:{tiny_dir.resolve()}"
    assert bb.preprocess.input_size == (64, 64)
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    assert bb.preprocess.interpolation == "bilinear"
    assert bb.num_features == 1280
    assert bb.weights_hash == identity.file_sha256(tiny_dir / "model.safetensors")
    assert len(bb.weights_hash) == 64
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_plain_path_is_local_dir_and_identity_ignores_spelling(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    a = create_backbone(f"./{tiny_dir.name}")
    b = create_backbone(f"local-dir:{tiny_dir}")
    assert a.spec == b.spec and a.identity() == b.identity()


def test_identity_changes_with_weights_preprocess_and_architecture(tiny_dir, tmp_path):
    base = create_backbone(f"local-dir:{tiny_dir}")
    ident = base.identity()
    assert ident.startswith(f"{base.spec}|{base.weights_hash}|{base.preprocess.key()}|arch-")
    assert ident.endswith(f"|decode-{DECODE_VERSION}")
    short = base.identity_hash()
    assert short.startswith("tiny_mnv2-") and re.fullmatch(r"[\w.-]+", short)  # filename-safe
    pp = base.preprocess
    variants = [
        base.replace(spec="local-dir:/elsewhere/tiny_mnv2"),
        base.replace(weights_hash="0" * 64),
        base.replace(preprocess=dataclasses.replace(pp, mean=(0.485, 0.456, 0.406))),
        base.replace(preprocess=dataclasses.replace(pp, input_size=(96, 96))),
        base.replace(preprocess=dataclasses.replace(pp, crop_pct=1.0)),
        base.replace(preprocess=dataclasses.replace(pp, interpolation="bicubic")),
    ]
    idents = {v.identity() for v in variants}
    assert ident not in idents and len(idents) == len(variants)
    hashes = {v.identity_hash() for v in variants}
    assert short not in hashes and len(hashes) == len(variants)

    # Other weights in the same folder (different content) -> different hash and identity.
    other = make_local_dir(tmp_path / "other", seed=1)
    assert create_backbone(str(other)).identity() != ident

    # Same weights file, but config.json's model_args change the network: other features, so
    # another identity (the weights hash alone would serve the avg-pool features from cache).
    maxpool = make_local_dir(tmp_path / "maxpool", seed=0)
    config = json.loads((maxpool / "config.json").read_text())
    (maxpool / "config.json").write_text(
        json.dumps({**config, "model_args": {"global_pool": "max"}})
    )
    mp = create_backbone(str(maxpool))
    assert mp.weights_hash == base.weights_hash and mp.preprocess.key() == pp.key()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(mp.model(x), base.model(x))
    # (the folder differs too: compare with the avg-pool network under the same spec)
    assert base.replace(spec=mp.spec).identity() != mp.identity()
    assert create_backbone(str(maxpool)).identity() == mp.identity()  # and it is stable


def test_random_init_identity_tracks_the_actual_weights():
    torch.manual_seed(0)
    a = create_backbone(TINY_ARCH, pretrained=False)
    torch.manual_seed(0)
    b = create_backbone(TINY_ARCH, pretrained=False)
    c = create_backbone(TINY_ARCH, pretrained=False)
    assert not a.pretrained and a.weights_hash.startswith("random-init")
    assert a.identity() == b.identity() != c.identity()
    assert a.preprocess.input_size == (224, 224)  # from timm's pretrained cfg, not hard-coded
    assert a.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_weights_file_is_hashed_once(tiny_dir, monkeypatch):
    identity.file_sha256(tiny_dir / "model.safetensors")
    calls = []
    real = identity.hashlib.file_digest
    monkeypatch.setattr(identity.hashlib, "file_digest", lambda *a: calls.append(1) or real(*a))
    identity.file_sha256(tiny_dir / "model.safetensors")
    assert calls == []
    st = (tiny_dir / "model.safetensors").stat()
    os.utime(tiny_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    identity.file_sha256(tiny_dir / "model.safetensors")  # touched: hashed again
    assert calls == [1]


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(TransferlabError) as err:
        create_backbone("mobilenetv2_10", pretrained=False)
    msg = str(err.value)
    assert "mobilenetv2_100" in msg and "transferlab backbones --filter" in msg


def test_unknown_pretrained_tag_lists_real_tags():
    with pytest.raises(TransferlabError, match="resnet18.a1_in1k"):
        create_backbone("resnet18.nonexistent_tag")


def test_missing_local_dir(tmp_path):
    with pytest.raises(TransferlabError, match="does not exist"):
        create_backbone(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(TransferlabError, match="no folder at"):
        create_backbone(str(tmp_path / "nope"))


def test_local_dir_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferlabError, match="config.json"):
        create_backbone(f"local-dir:{tmp_path / 'empty'}")
    no_weights = make_local_dir(tmp_path / "noweights", weights=False)
    with pytest.raises(TransferlabError, match="no weights file.*--no-pretrained"):
        create_backbone(f"local-dir:{no_weights}")
    assert not create_backbone(f"local-dir:{no_weights}", pretrained=False).pretrained


def test_local_dir_with_wrong_architecture(tmp_path):
    folder = make_local_dir(tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architecture": "resnet18"}))
    with pytest.raises(TransferlabError, match="could not load the model"):
        create_backbone(str(folder))


def _no_cached_weights(monkeypatch):
    monkeypatch.setattr(hub, "cached_weights_file", lambda cfg: None)
    for var in hub.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def test_offline_hub_fetch_gives_local_dir_hint(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    _no_cached_weights(monkeypatch)
    monkeypatch.setattr(hub, "can_reach", lambda host, **kw: True)

    def fail(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(TransferlabError) as err:
        create_backbone("resnet18")
    msg = str(err.value)
    assert "could not get pretrained weights for 'resnet18' (no network?)" in msg
    assert "local-dir:PATH" in msg and "--no-pretrained" in msg


def test_unreachable_hub_fails_fast_without_downloading(monkeypatch):
    _no_cached_weights(monkeypatch)
    monkeypatch.setattr(hub, "can_reach", lambda host, **kw: False)
    monkeypatch.setattr(
        timm, "create_model", lambda *a, **k: pytest.fail("must not try to download")
    )
    with pytest.raises(TransferlabError, match="no network.*local-dir:PATH"):
        create_backbone("mobilenetv2_050.lamb_in1k")
    with pytest.raises(TransferlabError, match="no network"):
        create_backbone("hf-hub:timm/mobilenetv2_050.lamb_in1k")


def test_hub_weights_already_cached_work_offline(tmp_path, monkeypatch):
    """A hub tag whose weights sit in the HF cache loads with no probe, hashed like a file."""
    import huggingface_hub.constants

    repo = tmp_path / "hf" / "models--timm--mobilenetv2_050.lamb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    model = timm.create_model(TINY_ARCH, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "can_reach", lambda *a, **k: pytest.fail("probed the net"))

    bb = create_backbone(TINY_ARCH)  # default tag resolved and recorded in the spec
    assert bb.spec == "mobilenetv2_050.lamb_in1k" and bb.pretrained
    assert bb.weights_hash == identity.file_sha256(weights)
    assert bb.preprocess.interpolation == "bicubic"  # the tag's own data config
    [info] = list_backbones("mobilenetv2_050")
    assert info.name == "mobilenetv2_050.lamb_in1k" and info.offline


def test_weights_loaded_from_an_unknown_place_are_hashed_by_content(tmp_path, monkeypatch):
    """If the downloaded file can't be located, the identity hashes the loaded tensors (a tag
    name would keep serving old cached features after the hub's weights change)."""
    import huggingface_hub.constants

    repo = tmp_path / "hf" / "models--timm--mobilenetv2_050.lamb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(create, "_hub_weights_hash", lambda cfg: None)

    a, b = create_backbone(TINY_ARCH), create_backbone(TINY_ARCH)
    assert a.weights_hash.startswith("loaded-") and a.weights_hash == b.weights_hash
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in changed.items()}, weights)
    assert create_backbone(TINY_ARCH).weights_hash != a.weights_hash


def test_hub_model_args_survive_save_and_load(tmp_path, monkeypatch):
    """An hf-hub config.json's model_args shape the network timm builds; the saved recipe must
    carry them, or the body rebuilt at load time is another network."""
    import huggingface_hub.constants

    from transferlab.backbones import timm_body_recipe
    from transferlab.model import build_body

    repo = tmp_path / "hf" / "models--someone--maxpool-mnv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    make_local_dir(snap)  # config.json + model.safetensors, as a hub repo holds them
    config = json.loads((snap / "config.json").read_text())
    config["model_args"] = {"global_pool": "max"}
    (snap / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "can_reach", lambda *a, **k: pytest.fail("probed the net"))

    bb = create_backbone("hf-hub:someone/maxpool-mnv2")
    recipe = timm_body_recipe(bb.spec, bb.model)
    assert recipe["model_args"] == {"global_pool": "max"}
    rebuilt = build_body(recipe).eval()
    rebuilt.load_state_dict(bb.model.state_dict())
    assert repr(rebuilt) == repr(bb.model)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), bb.model(x))


def test_list_backbones_marks_local_dirs_offline(tiny_dir, monkeypatch, tmp_path):
    infos = list_backbones("mobilenetv2", weights_dirs=[tiny_dir.parent])
    assert all(isinstance(i, BackboneInfo) for i in infos)
    local = [i for i in infos if i.name.startswith("local-dir:")]
    assert local == [
        BackboneInfo(
            name=f"local-dir:{tiny_dir.resolve()}",
            pretrained=True,
            offline=True,
            source=f"{tiny_dir.resolve()} ({TINY_ARCH})",
            input_size=(64, 64),
        )
    ]
    assert infos[0] == local[0]  # offline-ready folders come first
    timm_names = {i.name for i in infos if not i.name.startswith("local-dir:")}
    assert "mobilenetv2_100.ra_in1k" in timm_names
    assert all("mobilenetv2" in n for n in timm_names)

    # $TRANSFERLAB_WEIGHTS (pathsep-separated; a folder itself or its subfolders) and filtering.
    monkeypatch.setenv("TRANSFERLAB_WEIGHTS", os.pathsep.join([str(tiny_dir), str(tmp_path / "x")]))
    names = [i.name for i in list_backbones("tiny_mnv2")]
    assert names == [tiny_dir.name]  # on the search path: the folder's name is enough
    assert not [i for i in list_backbones("resnet50") if i.offline]
    # Every listed name is a valid spec for create_backbone, and the listing counts parameters.
    assert create_backbone(names[0]).spec == f"local-dir:{tiny_dir.resolve()}"
    (info,) = with_params(list_backbones("tiny_mnv2"))
    assert info.params == sum(
        p.numel() for p in timm.create_model(TINY_ARCH, num_classes=10).parameters()
    )


def test_a_name_resolves_through_the_search_path_from_any_directory(
    tiny_dir, monkeypatch, tmp_path
):
    """$TRANSFERLAB_WEIGHTS first, then the user's list (what setup.sh writes); a name that is on
    neither fails with one message naming both fixes."""
    name = tiny_dir.name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferlabError) as err:
        create_backbone(name)
    assert "--add-weights-dir" in str(err.value) and "TRANSFERLAB_WEIGHTS=" in str(err.value)
    listed = search.add_weights_dir(tiny_dir.parent)
    assert listed.read_text().splitlines() == [str(tiny_dir.parent.resolve())]
    search.add_weights_dir(tiny_dir.parent)  # recorded once
    assert listed.read_text().splitlines() == [str(tiny_dir.parent.resolve())]
    assert create_backbone(name).spec == f"local-dir:{tiny_dir.resolve()}"
    other = make_local_dir(tmp_path / "env" / name, seed=1)
    monkeypatch.setenv("TRANSFERLAB_WEIGHTS", str(other.parent))
    assert create_backbone(name).spec == f"local-dir:{other.resolve()}"  # the variable wins
    with pytest.raises(TransferlabError, match="not a folder"):
        search.add_weights_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (
            "mobilenetv2_100",
            ["conv_stem+bn1"] + [f"blocks.{i}" for i in range(6)] + ["blocks.6+conv_head+bn2"],
        ),
        ("resnet18", ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_stage_modules_ordered_stem_to_head(arch, expected):
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    stages = stage_modules(model)
    assert [name for name, _ in stages] == expected
    # Together the stages hold every parameter exactly once, in the model's own tensors.
    ids = [id(p) for _, m in stages for p in m.parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    # Single-module stages are the real submodules, so hooks on them fire (Grad-CAM).
    name, module = stages[-2]
    assert module is model.get_submodule(name)


def test_stage_modules_falls_back_to_children():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    assert [n for n, _ in stage_modules(model)] == ["0", "2"]


def test_backbone_positional_api():
    import inspect

    fields = list(inspect.signature(Backbone).parameters)
    assert fields[:6] == [
        "spec",
        "model",
        "preprocess",
        "num_features",
        "weights_hash",
        "pretrained",
    ]


def test_a_second_build_comes_from_the_card_without_the_network(tmp_path):
    """The first build of a local-dir folder writes its card; the next gives the same identity,
    preprocessing, recipe and body weights without building the network (until used); a
    changed weights file or config.json, or a damaged card, is a fresh build."""
    from safetensors.torch import load_file

    folder = make_local_dir(tmp_path / "tiny")
    first = create_backbone(str(folder))
    assert first.built
    again = create_backbone(str(folder))
    assert not again.built and again.body_file is not None
    assert again.identity() == first.identity()
    assert again.recipe == create.timm_body_recipe(first.spec, first.model)
    assert again.preprocess == first.preprocess and again.num_features == first.num_features
    saved = load_file(again.body_file)
    assert saved.keys() == first.model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in first.model.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again.model(x), first.model(x))  # built on first use
    assert again.built

    cards = tmp_path / "cache" / "backbones"
    next(cards.glob("*.json")).write_text("{not json")
    assert create_backbone(str(folder)).built  # damaged: built again (and re-carded)
    assert not create_backbone(str(folder)).built
    time.sleep(0.01)
    (folder / "model.safetensors").touch()
    assert create_backbone(str(folder)).built  # the weights file changed on disk
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_args": {"drop_rate": 0.1}}))
    assert create_backbone(str(folder)).built


def test_a_warm_features_fit_imports_neither_timm_torchvision_nor_dynamo(tmp_path):
    """A features re-fit whose images are all cached (features, scan index, backbone card,
    report figures and CAMs) never builds the network: timm and torchvision stay unimported,
    and the run saved is the same model."""
    import subprocess
    import sys

    from conftest import TINY_COLOURS, TINY_COUNTS, make_image

    data, seed = tmp_path / "data", 0
    for split, n in TINY_COUNTS.items():
        for label, colour in TINY_COLOURS.items():
            for i in range(n):
                seed += 1
                make_image(data / split / label / f"{split}{i}.jpg", (40 + i, 36), color=colour,
                           seed=seed)  # fmt: skip
    spec = f"local-dir:{make_local_dir(tmp_path / 'tiny')}"
    runs = [tmp_path / "cold", tmp_path / "warm"]
    outs = [
        subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "transferlab",
                "-q",
                "fit",
                str(data),
                "--out",
                str(run),
                "--backbone",
                spec,
                "--engine",
                "torch",
                "--workers",
                "0",
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        for run in runs
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]

    def imported(stderr: str) -> set[str]:
        return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()}

    assert {"timm", "torchvision"} <= imported(outs[0].stderr)
    assert not {"timm", "torchvision", "torch._dynamo"} & imported(outs[1].stderr)
    for name in ("body.safetensors", "head.safetensors"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()
    report = (runs[1] / "report.html").read_text()
    assert (
        '<section id="gradcam">' in report
        and "unavailable" not in report.split('<section id="gradcam">')[1].split("</section>")[0]
    )
    # a loaded run builds its body on first use: a report, or an evaluation on cached images,
    # of the warm run does not build it either (model.json records the arch the cache keys on)
    tl = [sys.executable, "-X", "importtime", "-m", "transferlab", "-q"]
    for command in (["report", str(runs[1])], ["evaluate", str(runs[1]), str(data)]):
        done = subprocess.run(tl + command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "timm" not in imported(done.stderr), command
    assert "test" in done.stdout and "accuracy" in done.stdout


def test_pretrained_weights_see_inputs_at_8_7_of_their_size_unless_told(tmp_path):
    """FixRes by default: a pretrained backbone's features (and fine-tuning) use 8/7 of its
    native input size, crop share kept, so a 224 model sees 256 px; random weights keep theirs,
    and --image-size wins. Each size is its own feature-cache identity."""
    folder = make_local_dir(tmp_path / "tiny", size=56)
    native = create_backbone(f"local-dir:{folder}", cache_dir=tmp_path / "cache")
    default = at_input_size(native)
    assert default.preprocess.input_size == (64, 64)
    assert default.preprocess.crop_pct == native.preprocess.crop_pct
    assert default.identity() != native.identity()
    assert at_input_size(native, 56) is native
    assert at_input_size(native, 96).preprocess.input_size == (96, 96)
    random = create_backbone(f"local-dir:{folder}", pretrained=False)
    assert at_input_size(random).preprocess.input_size == (56, 56)
    wide = dataclasses.replace(native.preprocess, input_size=(224, 300))
    assert wide.at_size(256).input_size == (256, 343)  # the shorter side, aspect kept
