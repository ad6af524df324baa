"""``transferlab cache info|prune|compact``: what the feature cache holds, trimming it, and
merging its packs.

The layout is :mod:`transferlab.cache`'s: ``features/<namespace>/packs/*.pack`` (+ ``.idx``,
records appended by one writer each), old ``features/<namespace>/<xx>/<digest>.feat`` entries,
``exports/*.onnx`` (one graph per backbone), and what makes a warm re-fit cheap:
``figures/`` (report pictures), ``backbones/`` (backbone cards) and ``heads/`` (fitted heads,
:mod:`transferlab.heads.remember`). Every entry can be recomputed, so pruning only
costs time: the least recently used files go first, a pack together with its index.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.cache import FeatureCache, FeatureStore
from transferlab.cache.packs import INDEX_SUFFIX, PACK_SUFFIX
from transferlab.cache.records import INDEX
from transferlab.errors import TransferlabError

__all__ = ["CacheInfo", "cache_info", "compact_cache", "parse_age", "parse_size", "prune_cache"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CacheInfo:
    root: str
    exists: bool
    bytes: int = 0
    files: int = 0
    namespaces: dict[str, dict[str, int]] = field(default_factory=dict)  # name → bytes, files
    exports: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "files": 0})
    # report figures and CAMs ("figures"), backbone cards ("backbones"), fitted heads ("heads")
    others: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_s: float | None = None  # age of the least recently used entry
    entries: int = 0  # feature records (pack records + old one-file entries; repeats count)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _entries(root: Path) -> list[tuple[list[Path], int, float]]:
    """(paths, size, last use) of every cache file, a pack and its index as one; last use =
    max(atime, mtime)."""
    out = []
    for sub in ("features", "exports", "figures", "backbones", "heads"):
        for dirpath, _, names in os.walk(root / sub):
            for name in names:
                p = Path(dirpath) / name
                if name.endswith(INDEX_SUFFIX) and p.with_suffix(PACK_SUFFIX).exists():
                    continue  # counted with its pack
                paths = [p, p.with_suffix(INDEX_SUFFIX)] if name.endswith(PACK_SUFFIX) else [p]
                size, used = 0, 0.0
                for q in paths:
                    try:
                        st = q.stat()
                    except OSError:
                        continue
                    size += st.st_size
                    used = max(used, st.st_atime, st.st_mtime)
                if used:
                    out.append((paths, size, used))
    return out


def _records(paths: list[Path]) -> int:
    if paths[0].suffix == PACK_SUFFIX:
        with contextlib.suppress(OSError):
            return paths[1].stat().st_size // INDEX.itemsize
        return 0
    return int(paths[0].suffix == ".feat")


def cache_info(root: str | os.PathLike | None = None) -> CacheInfo:
    """Sizes of the cache at ``root`` (default: the one fit uses)."""
    cache_root = FeatureCache(Path(root) if root else None).root
    info = CacheInfo(root=str(cache_root), exists=cache_root.is_dir())
    now = time.time()
    for paths, size, used in _entries(cache_root):
        info.bytes += size
        info.files += sum(p.exists() for p in paths)
        info.entries += _records(paths)
        rel = paths[0].relative_to(cache_root).parts
        if rel[0] == "features" and len(rel) > 2:
            ns = info.namespaces.setdefault(rel[1], {"bytes": 0, "files": 0})
        elif rel[0] == "exports":
            ns = info.exports
        else:
            ns = info.others.setdefault(rel[0], {"bytes": 0, "files": 0})
        ns["bytes"] += size
        ns["files"] += sum(p.exists() for p in paths)
        age = now - used
        info.oldest_s = age if info.oldest_s is None else max(info.oldest_s, age)
    return info


def prune_cache(
    root: str | os.PathLike | None = None,
    *,
    older_than_s: float | None = None,
    max_bytes: int | None = None,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete entries unused for ``older_than_s``, then the least recently used until the cache
    is within ``max_bytes``. A pack goes whole, with its index (records are not tracked one by
    one). Returns files and bytes removed and bytes kept."""
    if older_than_s is None and max_bytes is None:
        raise TransferlabError("cache prune: give --older-than (e.g. 30d) and/or --max-size (5GB)")
    cache_root = FeatureCache(Path(root) if root else None).root
    entries = sorted(_entries(cache_root), key=lambda e: e[2])  # least recently used first
    total = sum(size for _, size, _ in entries)
    now = time.time()
    doomed = []
    for paths, size, used in entries:
        too_old = older_than_s is not None and now - used > older_than_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        doomed.extend(p for p in paths if p.exists())
        total -= size
    removed_bytes = 0
    for path in doomed:
        try:
            size = path.stat().st_size
            if not dry_run:
                path.unlink()
            removed_bytes += size
        except FileNotFoundError:
            continue  # another process pruned or replaced it
    if not dry_run:
        _remove_empty_dirs(cache_root / "features")
    return {"files": len(doomed), "bytes": removed_bytes, "kept_bytes": total}


def compact_cache(root: str | os.PathLike | None = None) -> dict[str, int]:
    """Merge every namespace's finished packs and old one-file entries into one pack per
    namespace (packs a live writer holds are left alone). Returns the summed counts."""
    features = FeatureCache(Path(root) if root else None).root / "features"
    total = {"packs": 0, "records": 0, "dropped": 0, "migrated": 0}
    for folder in sorted(features.iterdir()) if features.is_dir() else []:
        if folder.is_dir():
            for k, v in FeatureStore(folder).compact().items():
                total[k] += v
    return total


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root:
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(dirpath)


def parse_size(text: str) -> int:
    """'5GB', '500 MiB', '1024' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise TransferlabError(f"--max-size {text!r}: give a size like 500MB, 5GB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_age(text: str) -> float:
    """'30d', '12h', '2w', '90m', '45s' → seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw])\s*", text)
    if not m:
        raise TransferlabError(f"--older-than {text!r}: give an age like 30d, 12h or 2w")
    return float(m.group(1)) * _AGES[m.group(2)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
