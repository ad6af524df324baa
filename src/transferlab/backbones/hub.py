"""Weights that come from elsewhere (the Hugging Face Hub, timm's URLs): where a local cache
already holds them, and whether their host can be reached right now."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

__all__ = [
    "PROXY_VARS",
    "cached_hub_file",
    "cached_weights_file",
    "can_reach",
    "http_errors",
    "hub_host",
    "weights_host",
]

# Offline, huggingface_hub retries DNS failures with back-off for ~45 s before giving up; a short
# direct probe lets us fail in a few seconds instead (skipped when a proxy is configured).
_PROBE_TIMEOUT_S = 3.0
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def cached_weights_file(cfg: dict[str, Any]) -> Path | None:
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


def hub_host() -> str:
    try:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        return "huggingface.co"


def weights_host(cfg: dict[str, Any]) -> str | None:
    if cfg.get("hf_hub_id"):
        return hub_host()  # timm prefers the hub whenever huggingface_hub is installed
    if cfg.get("url"):
        return urlparse(cfg["url"]).hostname
    return None


def can_reach(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
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


def http_errors() -> tuple[type[BaseException], ...]:
    """The HTTP error types of whichever download libraries are installed."""
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
