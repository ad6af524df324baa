"""The learning curve of ``transferlab curve`` (accuracy against images per class, the power
law and its estimates) as a report section: ``report RUN --curve CURVE_DIR``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from markupsafe import Markup

from transferlab.errors import TransferlabError
from transferlab.storage import read_json


def curve_report_section(curve: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``curve.html`` section from a ``curve`` output folder (or its ``curve.json``): the
    same fragment as the folder's own ``curve.html``, with its ``curve.png``."""
    # matplotlib and scipy come with it: imported only for a report that shows a curve
    from transferlab.selection.curve_output import CURVE_FILE, CURVE_PNG, curve_section

    path = Path(curve)
    path = path / CURVE_FILE if path.is_dir() else path
    report = read_json(path)
    if not isinstance(report, dict) or "rungs" not in report:
        raise TransferlabError(
            f"{path}: no learning curve here; pass the folder `transferlab curve` wrote"
        )
    png = path.with_name(CURVE_PNG)
    if not png.is_file():
        raise TransferlabError(f"{png}: missing (the chart `transferlab curve` draws)")
    return {"html": Markup(curve_section(report, png.read_bytes()))}
