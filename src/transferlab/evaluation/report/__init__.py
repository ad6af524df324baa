"""One self-contained HTML report per run (or ladder): what the data was, how training went,
how good the model is (with uncertainty), where and why it fails.

The file embeds every picture as a base64 ``data:`` URI and its CSS inline; it has no script
and no external reference, so it opens offline, can be mailed or attached to a ticket, and
renders the same anywhere. Thumbnails are small JPEGs and figures 100-dpi PNGs, so a report
weighs well under a megabyte for a typical run.

Each section is a function that computes its data (``sections_*``) and a Jinja2 template that
lays it out (``templates/``, autoescaped); :mod:`.assemble` collects the run and renders the
page. Each section is built independently: one that cannot be (images moved, Grad-CAM
unsupported for the architecture, ...) says why in place and the rest of the report is still
written.
"""

from __future__ import annotations

from transferlab.evaluation.report.assemble import build_report, write_report
from transferlab.evaluation.report.rungs import best_rung, load_ladder

__all__ = ["best_rung", "build_report", "load_ladder", "write_report"]
