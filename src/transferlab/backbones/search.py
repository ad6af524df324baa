"""Where local weight folders are found, so a backbone name resolves offline from any directory.

The search path, in order:

1. ``$TRANSFERLAB_WEIGHTS``: folders separated by ``os.pathsep``;
2. the user's list, ``<user config dir>/transferlab/weights-dirs`` (one absolute folder a line):
   ``transferlab backbones --add-weights-dir DIR`` appends to it, and ``scripts/setup.sh`` adds
   the bundled ``../shared/weights`` there.

A root counts when it is itself a timm folder (``config.json``) or holds such folders. A plain
``--backbone NAME`` (no ``local-dir:``/``hf-hub:``) is looked up as a folder called ``NAME`` under
these roots before timm's registry and the Hub are asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from transferlab.errors import TransferlabError

__all__ = [
    "WEIGHTS_ENV",
    "add_weights_dir",
    "find_local",
    "local_folders",
    "user_list",
    "weight_roots",
]

WEIGHTS_ENV = "TRANSFERLAB_WEIGHTS"


def user_list() -> Path:
    """The user's list of weight folders (it may not exist yet)."""
    return Path(platformdirs.user_config_dir("transferlab")) / "weights-dirs"


def weight_roots(extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """``extra``, then ``$TRANSFERLAB_WEIGHTS``, then the user's list; absolute, existing, once."""
    raw = [Path(p) for p in extra]
    raw += [Path(p) for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    try:
        lines = user_list().read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    raw += [Path(line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    roots: list[Path] = []
    for p in raw:
        p = p.expanduser().resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def local_folders(extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Every timm folder (``config.json`` inside) on the search path, in search order."""
    found: list[Path] = []
    for root in weight_roots(extra):
        if (root / "config.json").is_file():
            candidates = [root]
        else:
            try:
                candidates = sorted(c for c in root.iterdir() if (c / "config.json").is_file())
            except OSError:
                continue
        found += [c.resolve() for c in candidates if c.resolve() not in found]
    return found


def find_local(name: str) -> Path | None:
    """The first folder on the search path called ``name``, else None."""
    if not name or any(sep in name for sep in ("/", "\\", ":")):
        return None
    return next((f for f in local_folders() if f.name == name), None)


def add_weights_dir(folder: str | os.PathLike[str]) -> Path:
    """Record ``folder`` (absolute) in the user's list; returns the list's path."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise TransferlabError(f"{folder}: not a folder; pass the folder that holds the weights")
    target = user_list()
    try:
        existing = target.read_text(encoding="utf-8").splitlines() if target.is_file() else []
        if str(path) not in existing:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join([*existing, str(path)]) + "\n", encoding="utf-8")
    except OSError as e:
        raise TransferlabError(f"{target}: cannot record the weights folder ({e})") from e
    return target


def missing_hint(name: str) -> str:
    """How to make ``name`` resolve offline, naming a real folder that holds it when one is near
    (the development checkout's ``../shared/weights``)."""
    near = [
        Path.cwd() / ".." / "shared" / "weights",
        Path(__file__).parents[4] / "shared" / "weights",
    ]
    have = next((p.resolve() for p in near if (p / name / "config.json").is_file()), None)
    folder = str(have) if have is not None else "DIR"
    found = f" ({name} is in {have})" if have is not None else ""
    return (
        f"to use the weights folder {name!r} offline, put the folder that holds it on the weights "
        f"search path{found}: `transferlab backbones --add-weights-dir {folder}` (recorded in "
        f"{user_list()}) or `export {WEIGHTS_ENV}={folder}`"
    )
