"""The report's markup: the Jinja2 templates in ``templates/`` and the pictures they embed.

Autoescaping is on for every template, so file names, class names and messages can never
inject markup. Pictures are passed as ``data:`` URIs (base64 is HTML-safe, escaping leaves it
unchanged), so the page references nothing outside itself.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
from markupsafe import Markup
from PIL import Image

from transferlab.data.images import open_rgb
from transferlab.evaluation import plots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB_PX = 96  # dataset samples
GALLERY_PX = 144  # top losses / suspects: large enough to judge the label by eye
CAM_PX = 160  # each half of a Grad-CAM pair
_JPEG_QUALITY = 75


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


def figure_uri(fig: Figure) -> str:
    """A matplotlib figure as an embedded PNG."""
    data = plots.figure_bytes(fig, "png")
    fig.clear()  # free the artists now: a report draws many figures
    return data_uri(data, "image/png")


def jpeg_uri(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def thumbnail_uri(path: str, px: int) -> str:
    # draft decoding: a 500 px JPEG is DCT-scaled at decode time, ~5x cheaper than full size
    img = open_rgb(path, draft=(px, px))
    img.thumbnail((px, px))
    return jpeg_uri(np.asarray(img))
