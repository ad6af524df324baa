"""Pretrained timm backbones: creation, identity for caches, discovery, and stage listing.

A :class:`Backbone` is the frozen feature extractor plus everything that decides what its features
mean (weights, preprocessing). :meth:`Backbone.identity` condenses that into one string so the
feature cache and the ONNX export cache miss whenever any of it changes.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from transferlab.data.images import DECODE_VERSION
from transferlab.errors import TransferlabError
from transferlab.preprocess import Preprocess
from transferlab.storage import state_digest

__all__ = [
    "Backbone",
    "BackboneInfo",
    "create_backbone",
    "list_backbones",
    "stage_modules",
]

LOCAL_PREFIX = "local-dir:"
HUB_PREFIX = "hf-hub:"
EXAMPLE_LOCAL_DIR = "../shared/weights/mobilenetv2_100.tf_quant_in1k"
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
# Offline, huggingface_hub retries DNS failures with back-off for ~45 s before giving up; a short
# direct probe lets us fail in a few seconds instead (skipped when a proxy is configured).
_PROBE_TIMEOUT_S = 3.0
_SOURCE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+:")  # 2+ chars: "C:" is a drive
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@dataclass
class Backbone:
    """A feature extractor (``num_classes=0``, eval mode) and what its features depend on."""

    spec: str
    model: nn.Module
    preprocess: Preprocess
    num_features: int
    weights_hash: str
    pretrained: bool

    def identity(self) -> str:
        """``spec|weights_hash|preprocess key|arch-…|decode-N``: what the features depend on.

        The feature-cache namespace and the export cache key. ``create_backbone`` canonicalises
        ``spec`` (absolute ``local-dir:`` path), so two spellings of one folder share it;
        a loaded model rebuilds its Backbone from model.json, so it finds the same entries.
        ``arch`` hashes the module tree's repr: a local-dir config.json whose ``model_args``
        change the network (e.g. ``global_pool: max``) with the same weights file must miss.
        ``decode`` is :data:`~transferlab.data.images.DECODE_VERSION`.
        """
        arch = hashlib.sha256(repr(self.model).encode()).hexdigest()[:12]
        return (
            f"{self.spec}|{self.weights_hash}|{self.preprocess.key()}"
            f"|arch-{arch}|decode-{DECODE_VERSION}"
        )

    def identity_hash(self) -> str:
        """Filename-safe short form of :meth:`identity`: ``<model name>-<sha256 prefix>``."""
        name = self.spec.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1]
        digest = hashlib.sha256(self.identity().encode()).hexdigest()[:24]
        return f"{_safe_name(name)[:48]}-{digest}"


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``transferlab backbones``; ``name`` is always a valid ``--backbone`` spec."""

    name: str
    pretrained: bool
    offline: bool  # usable without a network connection right now
    source: str


# --------------------------------------------------------------------------------------------
# create_backbone


def create_backbone(spec: str, *, pretrained: bool = True) -> Backbone:
    """Build a timm feature extractor from a registry name, hf-hub:/local-dir: spec or folder.

    Raises TransferlabError for anything the user can fix (unknown name, bad folder, no weights).
    """
    spec = spec.strip()
    if not spec:
        raise TransferlabError("--backbone is empty: name a timm model, e.g. mobilenetv2_100")
    if spec.lower().startswith("hf_hub:"):  # timm's deprecated spelling
        spec = HUB_PREFIX + spec[len("hf_hub:") :]
    local_dir = _local_dir_of(spec)
    if local_dir is not None:
        return _create_local(local_dir, pretrained=pretrained)
    if spec.lower().startswith(HUB_PREFIX):
        return _create_hub(spec, pretrained=pretrained)
    return _create_registry(spec, pretrained=pretrained)


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


def _create_local(folder: Path, *, pretrained: bool) -> Backbone:
    folder = folder.resolve()
    if not folder.is_dir():
        raise TransferlabError(
            f"local-dir folder {str(folder)!r} does not exist. Pass a folder holding a timm "
            f"config.json and model.safetensors, e.g. --backbone local-dir:{EXAMPLE_LOCAL_DIR}"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TransferlabError(
            f"{str(folder)!r} has no config.json, so it is not a timm local-dir folder. It needs "
            f"config.json (architecture, pretrained_cfg) next to model.safetensors, as in "
            f"{EXAMPLE_LOCAL_DIR}"
        )
    config = _read_config(config_path)
    architecture = str(config.get("architecture", ""))
    _check_architecture(architecture, origin=f'{config_path} ("architecture")')
    weights_file = _local_weights_file(folder)
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
        weights_hash = _random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _create_hub(spec: str, *, pretrained: bool) -> Backbone:
    repo_id = spec[len(HUB_PREFIX) :]
    if not repo_id:
        raise TransferlabError(f"--backbone {spec!r} names no repo: write hf-hub:OWNER/NAME")
    repo_only = repo_id.split("@")[0]
    need_net = cached_hub_file(repo_only, ("config.json",)) is None or (
        pretrained
        and cached_hub_file(repo_only, ("model.safetensors", "pytorch_model.bin")) is None
    )
    if need_net:
        _require_network(spec, _hub_host())
    model = _timm_create(spec, pretrained=pretrained)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if pretrained:
        weights_hash = _hub_weights_hash(cfg) or _loaded_weights_hash(model)
    else:
        weights_hash = _random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _create_registry(spec: str, *, pretrained: bool) -> Backbone:
    arch, tag = timm.models.split_model_name_tag(spec)
    _check_architecture(arch, origin="--backbone")
    try:
        pcfg = timm.models.get_pretrained_cfg(spec)
    except RuntimeError:
        tags = timm.list_models(f"{arch}.*", pretrained=True)
        raise TransferlabError(
            f"'{arch}' has no pretrained tag {tag!r}. Available: "
            f"{', '.join(tags[:8]) or 'none'} (see transferlab backbones --filter {arch})"
        ) from None
    cfg = pcfg.to_dict() if pcfg is not None else {}
    if pretrained:
        if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
            raise TransferlabError(
                f"timm has no pretrained weights for {spec!r}. Pick a pretrained tag "
                f"(transferlab backbones --filter {arch}) or use --no-pretrained"
            )
        if _cached_weights_file(cfg) is None:
            _require_network(spec, _weights_host(cfg))
    model = _timm_create(spec, pretrained=pretrained)
    if pretrained:
        mcfg = dict(getattr(model, "pretrained_cfg", {}) or cfg)
        # Name the weights actually loaded ('resnet18' -> 'resnet18.a1_in1k'): one identity
        # for both spellings, and a saved model records exactly which tag it was built on.
        spec = f"{arch}.{mcfg.get('tag') or tag}" if (mcfg.get("tag") or tag) else arch
        weights_hash = _hub_weights_hash(mcfg) or _loaded_weights_hash(model)
    else:
        weights_hash = _random_init_hash(model)
    return _finish(spec, model, pretrained, weights_hash)


def _timm_create(spec: str, *, pretrained: bool) -> nn.Module:
    """timm.create_model, turning download failures into the one actionable message."""
    try:
        return timm.create_model(spec, pretrained=pretrained, num_classes=0)
    except TransferlabError:
        raise
    except (OSError, RuntimeError, ValueError, *_http_errors()) as exc:
        if not pretrained and not spec.lower().startswith(HUB_PREFIX):
            raise  # nothing was downloaded: this is a bug, not a user problem
        raise TransferlabError(_offline_message(spec, exc)) from exc


def _offline_message(spec: str, exc: BaseException | None = None) -> str:
    msg = (
        f"could not get pretrained weights for {spec!r} (no network?). Pass a local timm folder: "
        f"--backbone local-dir:PATH (config.json + model.safetensors), "
        f"e.g. {EXAMPLE_LOCAL_DIR}, or use --no-pretrained"
    )
    if exc is not None:
        msg += f" [{_brief(exc)}]"
    return msg


def _finish(spec: str, model: nn.Module, pretrained: bool, weights_hash: str) -> Backbone:
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
    if arch and timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch.lower(), timm.list_models(), n=3, cutoff=0.6)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    stem = re.split(r"[_\d]", close[0] if close else arch, maxsplit=1)[0] or arch
    raise TransferlabError(
        f"unknown timm architecture {arch!r} in {origin}. {hint}"
        f"List candidates with: transferlab backbones --filter {stem}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TransferlabError(f"{path} is not readable JSON ({_brief(exc)}); re-copy it") from exc
    if not isinstance(config, dict):
        raise TransferlabError(f"{path} must hold a JSON object with an 'architecture' key")
    return config


def _local_weights_file(folder: Path) -> Path | None:
    """The file timm's local-dir loader will pick (same preference order)."""
    for name in _PREFERRED_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in _WEIGHT_EXTS:
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found[0]
    return None


# --------------------------------------------------------------------------------------------
# weights hashing

_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


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
        cfg_path = cached_hub_file(spec[len("hf-hub:") :].split("@")[0], ["config.json"])
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        arch = cfg.get("architecture", arch)
        model_args = dict(cfg.get("model_args") or {})
    if arch is None:
        arch = spec.split(":", 1)[-1].split("/")[-1].split(".")[0]
    return {"kind": "timm", "architecture": arch, "model_args": model_args}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per process by (path, size, mtime) so a run hashes once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _hash_lock:
        _hash_memo[key] = digest
    return digest


def _random_init_hash(model: nn.Module) -> str:
    """Hash of the actual random weights.

    A constant "random-init" would let two different random models share cached features and
    exports; hashing the tensors keeps them apart (and lets a seeded init hit the cache).
    """
    return f"random-init-{state_digest(model)[:32]}"


def _loaded_weights_hash(model: nn.Module) -> str:
    """When the downloaded file can't be found in a local cache, hash what was loaded: a tag
    name alone would keep serving cached features after the hub's weights change."""
    return f"loaded-{state_digest(model)[:32]}"


def _hub_weights_hash(cfg: dict[str, Any]) -> str | None:
    cached = _cached_weights_file(cfg)
    return file_sha256(cached) if cached is not None else None


def _cached_weights_file(cfg: dict[str, Any]) -> Path | None:
    """Where the weights for a timm pretrained cfg already sit in the local HF/torch cache."""
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        found = cached_hub_file(str(hub_id).split("@")[0], names)
        if found is not None:
            return found
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


def cached_hub_file(repo_id: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` already in the local Hugging Face cache for ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # invalid repo ids raise validation errors: treat as "not cached"
            return None
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


# --------------------------------------------------------------------------------------------
# network probe


def _hub_host() -> str:
    try:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        return "huggingface.co"


def _weights_host(cfg: dict[str, Any]) -> str | None:
    if cfg.get("hf_hub_id"):
        return _hub_host()  # timm prefers the hub whenever huggingface_hub is installed
    if cfg.get("url"):
        return urlparse(cfg["url"]).hostname
    return None


def _require_network(spec: str, host: str | None) -> None:
    """Fail in seconds, not after the hub's ~45 s of retries, when the host is unreachable."""
    if host is None or any(os.environ.get(v) for v in _PROXY_VARS):
        return  # behind a proxy a direct probe proves nothing: let the real download decide
    if not _can_reach(host):
        raise TransferlabError(_offline_message(spec) + f" [cannot reach {host}]")


def _can_reach(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the wait: DNS resolution inside create_connection ignores the timeout.
    worker = threading.Thread(target=probe, daemon=True, name="transferlab-net-probe")
    worker.start()
    worker.join(timeout + 1.0)
    return bool(result and result[0])


def _http_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:
        pass
    return tuple(errors)


# --------------------------------------------------------------------------------------------
# list_backbones


def list_backbones(
    filter: str | None = None,  # noqa: A002 - public keyword name fixed by the CLI contract
    *,
    weights_dirs: Sequence[Path] = (),
) -> list[BackboneInfo]:
    """Local-dir folders (offline) first, then timm pretrained tags matching ``filter``.

    ``filter`` is a substring or a glob (``*`` / ``?``), case-insensitive. Local folders come from
    ``weights_dirs`` and ``$TRANSFERLAB_WEIGHTS`` (os.pathsep-separated); a folder counts when it,
    or one of its direct subfolders, holds a config.json.
    """
    pattern = _glob_of(filter)
    infos: list[BackboneInfo] = []
    seen: set[Path] = set()
    for folder in _local_folders(weights_dirs):
        if folder in seen:
            continue
        seen.add(folder)
        arch = ""
        with contextlib.suppress(TransferlabError):  # listed anyway; create_backbone explains
            arch = str(_read_config(folder / "config.json").get("architecture", ""))
        if pattern and not (
            fnmatch.fnmatch(folder.name.lower(), pattern) or fnmatch.fnmatch(arch.lower(), pattern)
        ):
            continue
        infos.append(
            BackboneInfo(
                name=f"{LOCAL_PREFIX}{folder}",
                pretrained=_local_weights_file(folder) is not None,
                offline=True,
                source=f"local folder ({arch or 'unknown architecture'})",
            )
        )
    for name in timm.list_models(pattern or "*", pretrained=True):
        try:
            pcfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            continue
        cfg = pcfg.to_dict() if pcfg is not None else {}
        if cfg.get("hf_hub_id"):
            source = f"hf-hub:{cfg['hf_hub_id']}"
        elif cfg.get("url"):
            source = str(cfg["url"])
        else:
            source = "timm"
        infos.append(
            BackboneInfo(
                name=name,
                pretrained=True,
                offline=_cached_weights_file(cfg) is not None,
                source=source,
            )
        )
    return infos


def _glob_of(filter_: str | None) -> str | None:
    if not filter_:
        return None
    f = filter_.strip().lower()
    return f if any(c in f for c in "*?[") else f"*{f}*"


def _local_folders(weights_dirs: Sequence[Path]) -> list[Path]:
    roots = [Path(p) for p in weights_dirs]
    roots += [Path(p) for p in os.environ.get("TRANSFERLAB_WEIGHTS", "").split(os.pathsep) if p]
    found: list[Path] = []
    for root in roots:
        root = root.expanduser()
        if not root.is_dir():
            continue
        if (root / "config.json").is_file():
            found.append(root.resolve())
            continue
        try:
            children = sorted(root.iterdir())
        except OSError:
            continue
        found += [c.resolve() for c in children if (c / "config.json").is_file()]
    return found


# --------------------------------------------------------------------------------------------
# stage_modules


def stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages, stem first, for partial unfreezing and Grad-CAM.

    Uses timm's coarse ``group_matcher()`` (the grouping timm itself uses for layer-wise LR decay).
    A stage that is one submodule is returned as that module, so forward hooks on it fire; a stage
    made of several sibling modules (e.g. MobileNet's ``conv_stem`` + ``bn1``) is returned as an
    ``nn.ModuleList`` of the real modules, named ``"a+b"`` — its parameters are the model's own, but
    hook its last element, since the list itself is never called. Parameters held directly by the
    model (a ViT's ``pos_embed``) belong to no stage. Models without a group matcher fall back to
    their top-level children that hold parameters.
    """
    matcher = getattr(model, "group_matcher", None)
    groups: dict[int, list[str]] | None = None
    if callable(matcher):
        try:
            from timm.models import group_parameters

            param_group = group_parameters(model, matcher(coarse=True), reverse=True)
            groups = _cover_groups(model, param_group)
        except (NotImplementedError, TypeError, AttributeError, KeyError):
            groups = None
    if not groups:
        return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    stages: list[tuple[str, nn.Module]] = []
    for gid in sorted(groups):
        names = groups[gid]
        modules = [model.get_submodule(n) for n in names]
        if len(modules) == 1:
            stages.append((names[0], modules[0]))
        else:
            stages.append(("+".join(names), nn.ModuleList(modules)))
    return stages


def _cover_groups(model: nn.Module, param_group: dict[str, int]) -> dict[int, list[str]]:
    """Map each group to the fewest, outermost submodules whose parameters all lie in that group."""
    groups_under: dict[str, set[int]] = {}
    for pname, gid in param_group.items():
        parts = pname.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            groups_under.setdefault(".".join(parts[:i]), set()).add(gid)
    chosen: dict[int, list[str]] = {}
    taken: list[str] = []
    for name, _ in model.named_modules():  # pre-order: outer modules before their children
        if not name or name not in groups_under:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        gids = groups_under[name]
        if len(gids) == 1:
            chosen.setdefault(next(iter(gids)), []).append(name)
            taken.append(name)
    return chosen


# --------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
