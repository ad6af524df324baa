"""matplotlib figures without pyplot: each on its own Agg canvas, encoded as PNG without the
"Software" stamp (reports and charts hold no URL). Every chart the package draws (the report's,
rank's and curve's) is made and encoded here; matplotlib is imported on the first figure."""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DPI", "figure_bytes", "new_figure", "save_figure"]

# Report figures are shown ~600-900 px wide; 100 dpi keeps PNGs at 20-60 KB each.
DPI = 100
# matplotlib stamps its name and URL into every PNG; reports are meant to hold no URL at all.
_NO_METADATA = {"Software": None}


@functools.cache
def _inline_figure() -> type[Figure]:
    """The Figure class :func:`new_figure` makes, defined when first needed: importing
    matplotlib costs ~0.4 s, which a report whose figures are all cached never pays."""
    from matplotlib.figure import Figure

    class InlineFigure(Figure):
        """A Figure that a notebook shows inline by itself: with no pyplot, IPython's
        matplotlib formatter may never be registered, so the figure renders its own PNG."""

        def _repr_png_(self) -> bytes:
            return figure_bytes(self)

    return InlineFigure


def new_figure(figsize: tuple[float, float], dpi: int = DPI) -> Figure:
    """A Figure with its own Agg canvas (no pyplot state), shown inline in a notebook."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _inline_figure()(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG (parent folders created) and return the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, metadata=_NO_METADATA)
    return path


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """The figure encoded in memory (for embedding in HTML)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=fig.dpi, metadata=_NO_METADATA if fmt == "png" else None)
    return buf.getvalue()
