"""The report's markup: the Jinja2 templates in ``templates/`` and the pictures they embed.

Autoescaping is on for every template, so file names, class names and messages can never
inject markup. Pictures are passed as ``data:`` URIs (base64 is HTML-safe, escaping leaves it
unchanged), so the page references nothing outside itself.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
from markupsafe import Markup
from PIL import Image

from transferlab import figures
from transferlab.data.images import open_rgb
from transferlab.errors import TransferlabError
from transferlab.evaluation import plots
from transferlab.storage import atomic_write_bytes, code_digest, value_digest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB_PX = 96  # dataset samples
GALLERY_PX = 144  # top losses / suspects: large enough to judge the label by eye
CAM_PX = 160  # each half of a Grad-CAM pair
_JPEG_QUALITY = 75
FIGURES = "figures"  # the report figures' folder in the cache
# ~30 KB each: the oldest go beyond this many (a few hundred reports' worth, ~60 MB)
KEEP_FIGURES = 2000
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal; "–" for a missing value."""
    return "–" if v is None else f"{100 * v:.1f}%"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("transferlab.evaluation.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails its section, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = pct
    return env


def render(template: str, **data: Any) -> Markup:
    """A template rendered with ``data``: escaped HTML, safe to embed in the page."""
    return Markup(environment().get_template(template).render(**data))


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_uri(
    plot: Callable[..., Figure], *args: Any, cache_dir: Path | None = None, **kwargs: Any
) -> str:
    """``plot(*args, **kwargs)`` (a :mod:`~transferlab.evaluation.plots` function) as an
    embedded PNG. With ``cache_dir``, the PNG is kept in its ``figures/`` under a digest of the
    plot's code and inputs: a report whose inputs did not change (a warm re-fit) draws nothing
    and does not even import matplotlib (~1 s of a 2-core box's time)."""
    path = None
    if cache_dir is not None:
        path = cache_dir / FIGURES / f"{_figure_key(plot, args, kwargs)}.png"
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            if data.startswith(_PNG_START) and data.endswith(_PNG_END):
                return data_uri(data, "image/png")
    fig = plot(*args, **kwargs)
    data = plots.figure_bytes(fig, "png")
    fig.clear()  # free the artists now: a report draws many figures
    if path is not None:
        _keep_figure(path, data)
    return data_uri(data, "image/png")


def cached_result(
    cache_dir: Path | None, parts: Any, compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``compute()`` (a JSON-able dict: embedded pictures and their captions), kept like the
    figures under a digest of ``parts`` (everything the result depends on, its code included)."""
    path = None
    if cache_dir is not None:
        path = cache_dir / FIGURES / f"{value_digest(parts)[:40]}.json"
        with contextlib.suppress(OSError, ValueError):
            got = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(got, dict):
                return got
    result = compute()
    if path is not None:
        _keep_figure(path, json.dumps(result).encode("utf-8"))
    return result


def _figure_key(plot: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> str:
    return value_digest(_plots_code_digest(), plot.__module__, plot.__qualname__, args, kwargs)[:40]


@functools.cache
def _plots_code_digest() -> str:
    """The drawing code's and matplotlib's versions: a changed plot function draws anew."""
    return code_digest(plots.__file__, figures.__file__) + version("matplotlib")


def _keep_figure(path: Path, data: bytes) -> None:
    """Store a drawn figure (best effort: a read-only cache only costs the redraw), and drop the
    oldest beyond :data:`KEEP_FIGURES`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        entries = list(os.scandir(path.parent))
    except (OSError, TransferlabError):
        return
    if len(entries) <= KEEP_FIGURES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime if e.is_file() else 0.0)
    for entry in entries[: len(entries) - KEEP_FIGURES * 9 // 10]:
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def jpeg_uri(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def thumbnail_uri(path: str, px: int) -> str:
    # draft decoding: a 500 px JPEG is DCT-scaled at decode time, ~5x cheaper than full size
    img = open_rgb(path, draft=(px, px))
    img.thumbnail((px, px))
    return jpeg_uri(np.asarray(img))
