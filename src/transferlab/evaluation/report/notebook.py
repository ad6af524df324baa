"""``transferlab.report(clf)``: write a run's report.html when it has none, then show it (inline
in a notebook, else in a browser)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.evaluation.card import show_report
from transferlab.evaluation.report.assemble import build_report
from transferlab.runs import REPORT_FILE

if TYPE_CHECKING:
    from transferlab.api import Classifier

__all__ = ["report"]


def report(clf: Classifier, *, rebuild: bool = False, show: bool = True) -> Path:
    """The report of ``clf``'s run folder (``fit(..., out=...)`` or ``load``): built from the
    run's own data when missing (or with ``rebuild``), displayed when ``show``."""
    if clf.run_dir is not None and (rebuild or not (Path(clf.run_dir) / REPORT_FILE).is_file()):
        build_report(clf.run_dir, classifier=clf)
    return show_report(clf) if show else Path(clf.run_dir or ".") / REPORT_FILE
