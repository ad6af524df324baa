"""Atomic writes and content digests: a crash leaves the old file, never half a new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.errors import TransferlabError


def printable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that any UTF-8 writer accepts: bytes of a name that is not valid UTF-8
    (held by Python as lone surrogates) become ``\\xNN`` escapes; valid names are unchanged."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (UTF-8; see :func:`atomic_write_bytes`).

    Text that holds file names which are not valid UTF-8 is written with those bytes as
    ``\\xNN`` escapes instead of failing after all the work that produced it.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = printable_path(text).encode("utf-8")
    atomic_write_bytes(Path(path), data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename; a failed write (full disk, no permission) is one
    TransferlabError naming the file and the cause, and leaves neither a temporary file nor a
    half-written ``path`` behind (the old file, if any, is untouched)."""
    tmp = _tmp_sibling(path)
    with _write_guard(path, tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def code_digest(*files: str | os.PathLike[str]) -> str:
    """A digest of source files: part of a cached result's key, so changed code recomputes."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def value_digest(*values: Any) -> str:
    """SHA-256 (hex) of nested values by content: arrays by dtype, shape and bytes, bytes as
    they are, mappings by sorted key, sequences in order, anything else by its exact repr (floats
    included). The one way a cache key (report figures, kept heads, backbone cards) is made."""
    h = hashlib.sha256()
    _feed(h, values)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, bytes):
        h.update(f"b{len(value)}:".encode())
        h.update(value)
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            _feed(h, k)
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r}\0".encode())


def atomic_copy(source: Path, path: Path) -> None:
    """Copy a file via a temporary file and a rename (failures as in atomic_write_bytes)."""
    tmp = _tmp_sibling(path)
    with _write_guard(path, tmp):
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def _write_guard(path: Path, tmp: Path) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            cause = getattr(exc, "strerror", None) or str(exc)
            raise TransferlabError(
                f"{printable_path(path)}: cannot write ({cause}); free disk space or fix the "
                "folder's permissions, then run the command again"
            ) from exc
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """Indented JSON, written atomically; NumPy values and paths become plain JSON."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=_json_default))


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """A JSON file's content; ``default`` when the file does not exist.

    The one policy for every run file (``model.json``, ``metrics.json``, ``data.json``,
    ``ladder.json``, ...): absent is normal (an older or partial run), but a file that is there
    and cannot be read or parsed is an error that names the file, never a silent default.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError) as e:
        raise TransferlabError(f"{path}: unreadable ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TransferlabError(f"{path}: unreadable JSON ({e})") from e


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Named tensors to a safetensors file, atomically (failures as in atomic_write_bytes)."""
    tmp = _tmp_sibling(path)
    with _write_guard(path, tmp):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        # safetensors creates its files 0600: weights beside a 0644 model.json that another
        # user (a serving container) cannot read, as in a shared cache.
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or corrupt file is a TransferlabError naming it."""
    if not path.is_file():
        raise TransferlabError(f"{path}: missing; the model folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise TransferlabError(f"{path}: corrupt or truncated weights file ({e})") from e


def keep_with_tensors(
    meta_path: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """A cache entry: ``tensors`` in ``meta_path``'s ``.safetensors`` sibling, then ``meta``
    (JSON, plus the tensor file's size) in ``meta_path``, whose presence marks it complete.
    Best effort: a cache that cannot be written only costs recomputing the entry."""
    tensors_path = meta_path.with_suffix(".safetensors")
    with contextlib.suppress(OSError, TransferlabError):
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, tensors_path)
        size = tensors_path.stat().st_size
        atomic_write_text(
            meta_path, json.dumps({**meta, "tensor_bytes": size}, default=_json_default)
        )


def read_with_tensors(meta_path: Path) -> tuple[dict[str, Any], Path] | None:
    """A :func:`keep_with_tensors` entry's meta and its tensor file, or None when it is absent,
    unreadable or its tensor file is not the size it was written with (tensors not read)."""
    tensors_path = meta_path.with_suffix(".safetensors")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = tensors_path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("tensor_bytes") != size:
        return None
    return meta, tensors_path


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file's tensors, from its header (no tensor is read, but
    a file cut short anywhere is detected: the header's offsets must end at the file's end); a
    missing or corrupt file is a TransferlabError naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise TransferlabError(f"{path}: missing; the model folder is incomplete")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise TransferlabError(f"{path}: corrupt or truncated weights file ({e})") from e


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and raw bytes; any dtype, bf16 too)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """A content hash of a module's weights, for cache identities and checkpoints."""
    return tensors_digest(module.state_dict())
