"""Build a :class:`~.identity.Backbone` from a ``--backbone`` spec: a timm registry name, an
``hf-hub:`` repo or a ``local-dir:`` folder; and the recipe that rebuilds its body later."""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from transferlab.backbones import card, hub, search
from transferlab.backbones.identity import (
    Backbone,
    file_sha256,
    loaded_weights_hash,
    random_init_hash,
)
from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess

__all__ = [
    "LOCAL_PREFIX",
    "create_backbone",
    "local_weights_file",
    "read_config",
    "timm_body_recipe",
]

LOCAL_PREFIX = "local-dir:"
HUB_PREFIX = "hf-hub:"
EXAMPLE_LOCAL_DIR = "/path/to/weights/mobilenetv2_100.tf_quant_in1k"
# The weight files timm's local-dir loader looks for, in its order of preference
# (timm.models._hub._PREFERRED_FILES, private, so mirrored here).
_PREFERRED_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_model.pth",
)
_WEIGHT_EXTS = (".safetensors", ".pth", ".pth.tar", ".bin")
_SOURCE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+:")  # 2+ chars: "C:" is a drive


def create_backbone(
    spec: str, *, pretrained: bool = True, cache_dir: str | os.PathLike[str] | None = None
) -> Backbone:
    """Build a timm feature extractor from a registry name, hf-hub:/local-dir: spec or folder.

    A pretrained local-dir folder built before comes from its card in ``cache_dir`` (default:
    the user cache; :mod:`~.card`), its network built only when first used. Raises
    TransferlabError for anything the user can fix (unknown name, bad folder, no weights).
    """
    spec = spec.strip()
    if not spec:
        raise TransferlabError("--backbone is empty: name a timm model, e.g. mobilenetv2_100")
    if spec.lower().startswith("hf_hub:"):  # timm's deprecated spelling
        spec = HUB_PREFIX + spec[len("hf_hub:") :]
    local_dir = search.find_local(spec) or _local_dir_of(spec)
    if local_dir is not None:
        return _local_with_card(local_dir.resolve(), pretrained, cache_dir)
    if spec.lower().startswith(HUB_PREFIX):
        return _create_hub(spec, pretrained=pretrained)
    return _create_registry(spec, pretrained=pretrained)


#: Pretrained weights see their inputs at 8/7 of the size they were trained at by default:
#: trained on RandomResizedCrop, they saw objects larger than a centre crop at the same size
#: shows them, and a larger test size undoes that (FixRes: Touvron et al., NeurIPS 2019). On the
#: four shared ImageNet CNNs x cats / flowers / hymenoptera, the linear probe's val log loss fell
#: in 11 of 12 cases at 8/7 (224 -> 256, 260 -> 296); MobileNetV2 on cats: test 97.7% -> 98.3%.
TEST_SIZE_FACTOR = 8 / 7


def at_input_size(backbone: Backbone, image_size: int | None = None) -> Backbone:
    """``backbone`` with the input size its features and its fine-tuning use: ``image_size``
    (the shorter side) when given, else for pretrained weights :data:`TEST_SIZE_FACTOR` times
    their native size, rounded to a multiple of 8; random weights keep their native size."""
    pre = backbone.preprocess
    if image_size is None:
        if not backbone.pretrained:
            return backbone
        image_size = 8 * round(min(pre.input_size) * TEST_SIZE_FACTOR / 8)
    sized = pre.at_size(int(image_size))
    return backbone if sized == pre else backbone.replace(preprocess=sized)


def timm_body_recipe(spec: str, model: nn.Module) -> dict[str, Any]:
    """Architecture + constructor args needed to rebuild a timm body without its source folder."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    model_args: dict[str, Any] = {}
    # timm applies a local-dir or hf-hub config.json's model_args when it builds the model; the
    # recipe must repeat them or the body rebuilt at load time is another network.
    cfg_path: Path | None = None
    if spec.startswith("local-dir:"):
        cfg_path = Path(spec[len("local-dir:") :]) / "config.json"
    elif spec.startswith("hf-hub:"):
        cfg_path = hub.cached_hub_file(spec[len("hf-hub:") :].split("@")[0], ["config.json"])
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        arch = cfg.get("architecture", arch)
        model_args = dict(cfg.get("model_args") or {})
    if arch is None:
        arch = spec.split(":", 1)[-1].split("/")[-1].split(".")[0]
    return {"kind": "timm", "architecture": arch, "model_args": model_args}


def _local_dir_of(spec: str) -> Path | None:
    """The folder a spec names (``local-dir:PATH`` or a plain existing path), else None."""
    if spec.lower().startswith(LOCAL_PREFIX):
        raw = spec[len(LOCAL_PREFIX) :]
        if not raw:
            raise TransferlabError(
                f"--backbone {spec!r} names no folder: write local-dir:PATH, "
                f"e.g. local-dir:{EXAMPLE_LOCAL_DIR}"
            )
        return Path(raw).expanduser()
    import timm

    if timm.is_model(timm.models.split_model_name_tag(spec)[0]):
        return None  # a registry name wins over a same-named folder in the cwd
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if any(c in spec for c in ("/", "\\")) and not _SOURCE_PREFIX.match(spec):
        # Looks like a path (or a Hub repo id without its prefix): say which one we can't find.
        hub_hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith("."):
            hub_hint = f"; for a Hugging Face Hub model write hf-hub:{spec}"
        raise TransferlabError(
            f"no folder at {spec!r} (from --backbone). Pass an existing timm folder "
            f"(config.json + model.safetensors), e.g. local-dir:{EXAMPLE_LOCAL_DIR}{hub_hint}"
        )
    return None


# --------------------------------------------------------------------------------------------
# the three sources


def _local_with_card(
    folder: Path, pretrained: bool, cache_dir: str | os.PathLike[str] | None
) -> Backbone:
    """A local-dir backbone from its card when there is one (unbuilt), else built and carded."""
    weights_file = local_weights_file(folder) if pretrained and folder.is_dir() else None
    key = card.card_key(folder, weights_file) if weights_file is not None else None
    found = card.read_card(key, cache_dir) if key is not None else None
    if found is not None:
        return card.card_backbone(found, functools.partial(_build_local, folder))
    backbone = _create_local(folder, pretrained=pretrained)
    if key is not None:
        recipe = timm_body_recipe(backbone.spec, backbone.model)
        card.write_card(key, backbone, recipe, cache_dir)
    return backbone


def _build_local(folder: Path) -> nn.Module:
    """The network of a carded local-dir backbone (module-level: a Backbone is pickled to
    ranks and workers with this as its builder)."""
    return _create_local(folder, pretrained=True).model


def _create_local(folder: Path, *, pretrained: bool) -> Backbone:
    import timm

    folder = folder.resolve()
    config_path = folder / "config.json"
    architecture = _check_local_folder(folder, config_path)
    weights_file = local_weights_file(folder)
    if pretrained and weights_file is None:
        raise TransferlabError(
            f"{str(folder)!r} has config.json but no weights file (model.safetensors or "
            f"pytorch_model.bin). Copy the weights there, or use --no-pretrained"
        )
    spec = f"{LOCAL_PREFIX}{folder}"
    try:
        model = timm.create_model(spec, pretrained=pretrained, num_classes=0)
    except TransferlabError:
        raise
    except Exception as exc:  # safetensors/torch raise assorted types for bad files
        raise TransferlabError(
            f"could not load the model in {str(folder)!r}: {_brief(exc)}. Check that config.json's "
            f"architecture ({architecture}) matches the weights file, or re-copy the folder"
        ) from exc
    if pretrained:
        assert weights_file is not None
        weights_hash = file_sha256(weights_file)
    else:
        weights_hash = random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _check_local_folder(folder: Path, config_path: Path) -> str:
    """The architecture a local-dir folder's config.json names, checked against timm."""
    if not folder.is_dir():
        raise TransferlabError(
            f"local-dir folder {str(folder)!r} does not exist. Pass a folder holding a timm "
            f"config.json and model.safetensors, e.g. --backbone local-dir:{EXAMPLE_LOCAL_DIR}"
        )
    if not config_path.is_file():
        raise TransferlabError(
            f"{str(folder)!r} has no config.json, so it is not a timm local-dir folder. It needs "
            f"config.json (architecture, pretrained_cfg) next to model.safetensors, as in "
            f"{EXAMPLE_LOCAL_DIR}"
        )
    config = read_config(config_path)
    architecture = str(config.get("architecture", ""))
    _check_architecture(architecture, origin=f'{config_path} ("architecture")')
    return architecture


def _create_hub(spec: str, *, pretrained: bool) -> Backbone:
    repo_id = spec[len(HUB_PREFIX) :]
    if not repo_id:
        raise TransferlabError(f"--backbone {spec!r} names no repo: write hf-hub:OWNER/NAME")
    repo_only = repo_id.split("@")[0]
    need_net = hub.cached_hub_file(repo_only, ("config.json",)) is None or (
        pretrained
        and hub.cached_hub_file(repo_only, ("model.safetensors", "pytorch_model.bin")) is None
    )
    if need_net:
        _require_network(spec, hub.hub_host())
    model = _timm_create(spec, pretrained=pretrained)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if pretrained:
        weights_hash = _hub_weights_hash(cfg) or loaded_weights_hash(model)
    else:
        weights_hash = random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _create_registry(spec: str, *, pretrained: bool) -> Backbone:
    import timm

    arch, tag = timm.models.split_model_name_tag(spec)
    try:
        _check_architecture(arch, origin="--backbone")
    except TransferlabError as e:  # perhaps a weights folder's name, off the search path
        raise TransferlabError(f"{e}; {search.missing_hint(spec)}") from None
    try:
        pcfg = timm.models.get_pretrained_cfg(spec)
    except RuntimeError:
        tags = timm.list_models(f"{arch}.*", pretrained=True)
        raise TransferlabError(
            f"'{arch}' has no pretrained tag {tag!r}. Available: "
            f"{', '.join(tags[:8]) or 'none'} (see transferlab backbones --filter {arch}); "
            + search.missing_hint(spec)
        ) from None
    cfg = pcfg.to_dict() if pcfg is not None else {}
    if pretrained:
        if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
            raise TransferlabError(
                f"timm has no pretrained weights for {spec!r}. Pick a pretrained tag "
                f"(transferlab backbones --filter {arch}) or use --no-pretrained"
            )
        if hub.cached_weights_file(cfg) is None:
            _require_network(spec, hub.weights_host(cfg))
    model = _timm_create(spec, pretrained=pretrained)
    if pretrained:
        mcfg = dict(getattr(model, "pretrained_cfg", {}) or cfg)
        # Name the weights actually loaded ('resnet18' -> 'resnet18.a1_in1k'): one identity
        # for both spellings, and a saved model records exactly which tag it was built on.
        spec = f"{arch}.{mcfg.get('tag') or tag}" if (mcfg.get("tag") or tag) else arch
        weights_hash = _hub_weights_hash(mcfg) or loaded_weights_hash(model)
    else:
        weights_hash = random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _hub_weights_hash(cfg: dict[str, Any]) -> str | None:
    cached = hub.cached_weights_file(cfg)
    return file_sha256(cached) if cached is not None else None


# --------------------------------------------------------------------------------------------
# timm, and what can go wrong with it


def _timm_create(spec: str, *, pretrained: bool) -> nn.Module:
    """timm.create_model, turning download failures into the one actionable message."""
    import timm

    try:
        return timm.create_model(spec, pretrained=pretrained, num_classes=0)
    except TransferlabError:
        raise
    except (OSError, RuntimeError, ValueError, *hub.http_errors()) as exc:
        if not pretrained and not spec.lower().startswith(HUB_PREFIX):
            raise  # nothing was downloaded: this is a bug, not a user problem
        raise TransferlabError(_offline_message(spec, exc)) from exc


def _require_network(spec: str, host: str | None) -> None:
    """Fail in seconds, not after the hub's ~45 s of retries, when the host is unreachable."""
    if host is None or any(os.environ.get(v) for v in hub.PROXY_VARS):
        return  # behind a proxy a direct probe proves nothing: let the real download decide
    if not hub.can_reach(host):
        raise TransferlabError(_offline_message(spec) + f" [cannot reach {host}]")


def _offline_message(spec: str, exc: BaseException | None = None) -> str:
    msg = (
        f"could not get pretrained weights for {spec!r} (no network?); "
        f"{search.missing_hint(spec)}; or pass a timm folder: --backbone local-dir:PATH; "
        "or use --no-pretrained"
    )
    if exc is not None:
        msg += f" [{_brief(exc)}]"
    return msg


def _finish(spec: str, model: nn.Module, pretrained: bool, weights_hash: str) -> Backbone:
    import timm

    # Eval mode matters beyond dropout: the shared weights carry folded BN constants that only
    # reproduce the pretrained function with running statistics (see shared/weights/MANIFEST.md).
    model.eval()
    preprocess = Preprocess.from_timm(timm.data.resolve_model_data_config(model))
    # With num_classes=0 timm returns pre-logits, which is head_hidden_size when the model has a
    # hidden head layer (e.g. MobileNetV3: 960 channels -> 1280 features), else num_features.
    num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(
        spec=spec,
        model=model,
        preprocess=preprocess,
        num_features=num_features,
        weights_hash=weights_hash,
        pretrained=pretrained,
    )


def _check_architecture(arch: str, *, origin: str) -> None:
    import timm

    if arch and timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch.lower(), timm.list_models(), n=3, cutoff=0.6)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    stem = re.split(r"[_\d]", close[0] if close else arch, maxsplit=1)[0] or arch
    raise TransferlabError(
        f"unknown timm architecture {arch!r} in {origin}. {hint}"
        f"List candidates with: transferlab backbones --filter {stem}"
    )


def read_config(path: Path) -> dict[str, Any]:
    """A local-dir folder's config.json, or a TransferlabError saying why it can't be read."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TransferlabError(f"{path} is not readable JSON ({_brief(exc)}); re-copy it") from exc
    if not isinstance(config, dict):
        raise TransferlabError(f"{path} must hold a JSON object with an 'architecture' key")
    return config


def local_weights_file(folder: Path) -> Path | None:
    """The file timm's local-dir loader will pick (same preference order)."""
    for name in _PREFERRED_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in _WEIGHT_EXTS:
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found[0]
    return None


def _brief(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for messages that quote it."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
