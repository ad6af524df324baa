"""A trained classifier at a glance: its ``repr``, its notebook card, and its report shown.

The card answers what a notebook user asks first: which backbone and strategy, which classes,
how accurate on val and test (with the 95% interval, so a 20-image test set is not mistaken
for a verdict), and where the run folder and its report are.
"""

from __future__ import annotations

import html
import os
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import TransferlabError
from transferlab.evaluation.run_data import classifier_split
from transferlab.runs import REPORT_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from transferlab.api import Classifier

__all__ = ["ClassifierViews", "card_html", "card_text", "show_report"]

_MAX_CLASSES = 12  # beyond this the card lists the first ones and a count


def _facts(clf: Classifier) -> list[tuple[str, str]]:
    saved = clf.saved
    classes = clf.classes
    shown = ", ".join(classes[:_MAX_CLASSES])
    if len(classes) > _MAX_CLASSES:
        shown += f", … ({len(classes)} in all)"
    facts = [
        ("backbone", str(saved.body.get("spec", saved.config.get("backbone", "?")))),
        ("strategy", _strategy(saved.strategy, saved.head, saved.config)),
        ("classes", shown),
    ]
    for split in ("val", "test"):
        m = clf.metrics.get(split)
        if m and "accuracy" in m:
            facts.append((f"{split} accuracy", _accuracy(m)))
    if clf.run_dir is not None:
        facts.append(("run folder", str(clf.run_dir)))
        report = Path(clf.run_dir) / REPORT_FILE
        if report.is_file():
            facts.append(("report", str(report)))
    return facts


def _strategy(strategy: str, head: dict[str, Any], config: dict[str, Any]) -> str:
    """``features + linear head``; an ensemble: its members' weights (the head is their mix)."""
    if "weights" not in head:
        return f"{strategy} + {config.get('head', '?')} head"
    return f"{strategy}, weights {' / '.join(f'{w:.2f}' for w in head['weights'])} (chosen on val)"


def _accuracy(m: dict[str, Any]) -> str:
    text = f"{m['accuracy']:.3f}"
    ci = m.get("accuracy_ci95")
    if ci:
        text += f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})"
    n = m.get("n") or m.get("support")
    if isinstance(n, int):
        text += f", n={n}"
    return text


def card_text(clf: Classifier) -> str:
    """``Classifier(backbone=..., strategy=..., classes=[...], test accuracy=...)``."""
    inner = ", ".join(f"{k}={v}" if k != "classes" else f"classes=[{v}]" for k, v in _facts(clf))
    return f"Classifier({inner})"


def card_html(clf: Classifier) -> str:
    """A compact two-column table for Jupyter's rich display."""
    rows = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in _facts(clf)
    )
    return f"<div><b>transferlab Classifier</b><table>{rows}</table></div>"


def show_report(clf: Classifier) -> Path:
    """Display the run's report.html inline in a notebook, else open it in a browser."""
    if clf.run_dir is None:
        raise TransferlabError(
            "this classifier has no run folder: fit(..., out='runs/name') saves one, "
            "then transferlab.report(clf) writes its report.html"
        )
    path = Path(clf.run_dir) / REPORT_FILE
    if not path.is_file():
        raise TransferlabError(
            f"{path} does not exist: transferlab.report(clf) (or `transferlab report "
            f"{clf.run_dir}`) writes it"
        )
    if not _display_inline(path):
        webbrowser.open(path.resolve().as_uri())
    return path


def _display_inline(path: Path) -> bool:
    """Show ``path`` in the notebook the code runs in; False when there is none."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return False
    # srcdoc keeps the report self-contained (its images are data: URIs) and sandboxed from
    # the notebook's own page.
    doc = html.escape(path.read_text(encoding="utf-8"), quote=True)
    frame = f'<iframe srcdoc="{doc}" style="width:100%;height:720px;border:0"></iframe>'
    display({"text/html": frame, "text/plain": str(path)}, raw=True)
    return True


class ClassifierViews:
    """What a :class:`~transferlab.api.Classifier` shows: figures (matplotlib Figures, shown
    inline in a notebook; a PNG too when ``out`` is given), its card and its report."""

    def __repr__(self) -> str:
        return card_text(self)  # type: ignore[arg-type]

    def _repr_html_(self) -> str:
        return card_html(self)  # type: ignore[arg-type]

    def report(self) -> Path:
        """Show the run's report.html: inline in a notebook, else in a browser."""
        return show_report(self)  # type: ignore[arg-type]

    def plot_curves(self, out: str | os.PathLike | None = None) -> Figure:
        """Learning curves, accuracy | loss, train vs val (per epoch, or per L2 of a linear
        head)."""
        from transferlab.evaluation import plots  # matplotlib: imported when first drawn

        return plots.plot_learning_curves(self.history, out=out)  # type: ignore[attr-defined]

    def plot_confusion(self, split: str = "test", out: str | os.PathLike | None = None) -> Figure:
        """Confusion matrix of a split evaluated at fit time: counts | row-normalised."""
        metrics = self.metrics  # type: ignore[attr-defined]
        if split not in metrics:
            raise TransferlabError(f"no '{split}' results; have: {', '.join(metrics)}")
        from transferlab.evaluation import plots

        cm = metrics[split]["confusion_matrix"]
        classes = self.classes  # type: ignore[attr-defined]
        return plots.plot_confusion(cm, classes, title=f"{split} confusion matrix", out=out)

    def plot_reliability(
        self,
        split: str = "test",
        *,
        data: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
    ) -> Figure:
        """Reliability diagram + ECE of a split (of the fitted data, or of ``data``)."""
        from transferlab.evaluation import plots

        s = classifier_split(self, split, data)  # type: ignore[arg-type]
        probs = self.predict_proba_split(s)  # type: ignore[attr-defined]
        return plots.plot_reliability(probs, s.labels, title=f"reliability ({split})", out=out)

    def explain(self, image: Any, *, target: str | None = None, method: str = "hirescam") -> Figure:
        """The picture as the model sees it | its class activation map (HiResCAM by default).
        ``image``: a path, PIL image, array, tensor or bytes; ``target``: a class name (default:
        the predicted class)."""
        from transferlab.evaluation.explain.figures import explain  # torch-heavy: on first use

        return explain(self, image, target=target, method=method)  # type: ignore[arg-type]
