"""What ``curve`` writes: ``curve.json``, ``curve.png`` and ``curve.html`` (one page, no links).

The chart: test accuracy (val without a test split) against images per class on a log axis,
mean ± sd over seeds per rung, with the fitted power law drawn solid across the measured sizes
and dashed where it extrapolates; the targets are dotted lines.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.backbones.identity import short_name
from transferlab.figures import figure_bytes, new_figure
from transferlab.selection.powerlaw import PowerLaw
from transferlab.storage import atomic_write_bytes, atomic_write_text, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CURVE_FILE",
    "CURVE_HTML",
    "CURVE_PNG",
    "curve_html",
    "curve_section",
    "describe_estimate",
    "plot_curve",
    "write_outputs",
]

CURVE_FILE = "curve.json"
CURVE_PNG = "curve.png"
CURVE_HTML = "curve.html"
_EXTEND = 4.0  # the dashed extrapolation runs to this multiple of the largest measured size


def write_outputs(report: dict[str, Any], out: Path, laws: Mapping[str, PowerLaw | None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CURVE_FILE, report)
    png = figure_bytes(plot_curve(report, laws))
    atomic_write_bytes(out / CURVE_PNG, png)
    atomic_write_text(out / CURVE_HTML, curve_html(report, png))


def plot_curve(report: Mapping[str, Any], laws: Mapping[str, PowerLaw | None]) -> Figure:
    split = report["eval_split"]
    fig = new_figure((8, 5))
    ax = fig.subplots()
    for k, rung in enumerate(report["rungs"]):
        colour = f"C{k}"
        pts = [p for p in rung["points"] if split in p]
        x = [p["images_per_class"] for p in pts]
        ax.errorbar(x, [p[split]["mean"] for p in pts], yerr=[p[split]["sd"] for p in pts],
                    fmt="o", capsize=3, color=colour, label=rung["name"])  # fmt: skip
        law = laws.get(rung["name"])
        if law is not None:
            inside = np.geomspace(min(law.sizes), max(law.sizes), 50)
            beyond = np.geomspace(max(law.sizes), _EXTEND * max(law.sizes), 20)
            ax.plot(inside, law.accuracy(inside), "-", color=colour, alpha=0.7)
            ax.plot(beyond, law.accuracy(beyond), "--", color=colour, alpha=0.7)
    for t in report["targets"]:
        ax.axhline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("images per class (train)")
    ax.set_ylabel(f"{split} accuracy (mean ± sd over {len(report['seeds'])} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"learning curve: {report['data']} ({short_name(report['backbone'])})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()  # constrained layout costs seconds per draw on a busy CPU
    return fig


def _cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "–"
    text = f"{m['mean']:.1%} ± {m['sd']:.1%}"
    if m.get("ci95"):
        text += f" [{m['ci95'][0]:.1%}, {m['ci95'][1]:.1%}]"
    return text


def describe_estimate(t: Mapping[str, Any]) -> str:
    """One target of a power law, in words: the estimate, its interval, any extrapolation."""
    if not t["reachable"]:
        return f"{t['accuracy']:.0%}: not reached by this law (more of the same data won't)"
    lo, hi = t["ci95"]
    span = f"{lo:.0f}–{'∞' if hi is None else f'{hi:.0f}'}" if lo is not None else "?"
    low, high = t["measured"]
    flag = ""
    if t["images_per_class"] < low:
        flag = f" — extrapolated below the smallest size measured ({low:g})"
    elif t["images_per_class"] > high:
        flag = f" — extrapolated beyond the largest size measured ({high:g})"
    return f"{t['accuracy']:.0%}: ≈{t['images_per_class']:.0f} images per class (95% {span}){flag}"


def curve_section(report: Mapping[str, Any], png: bytes) -> str:
    """An HTML fragment (no page around it, no links): what the data and the seeds were, the
    chart, a rung × size table, and each rung's law with its estimates. ``curve.html`` is this
    in a page; a report can embed it as one section."""
    split = report["eval_split"]
    head = "".join(f"<th>{html.escape(str(s))}</th>" for s in report["per_class"])
    rows = [
        f"<tr><th>{html.escape(r['name'])}</th>"
        + "".join(f"<td>{_cell(p.get(split))}</td>" for p in r["points"])
        + "</tr>"
        for r in report["rungs"]
    ]
    laws = [_law_item(r["name"], r.get("power_law")) for r in report["rungs"]]
    img = base64.b64encode(png).decode("ascii")
    return (
        f"<p>{html.escape(str(report['data']))}, backbone "
        f"{html.escape(short_name(report['backbone']))}; {split} accuracy, mean ± sd over seeds "
        f"{report['seeds']} [95% t interval of the mean]; train images per class in full: "
        f"{html.escape(str(report['train_per_class']))}.</p>"
        f"<img alt='learning curve' src='data:image/png;base64,{img}' style='max-width:100%'>"
        f"<table><tr><th>rung \\ per class</th>{head}</tr>{''.join(rows)}</table>"
        f"<h3>Power law</h3><ul>{''.join(laws)}</ul>"
    )


def _law_item(name: str, law: Mapping[str, Any] | None) -> str:
    if law is None:
        return f"<li>{html.escape(name)}: no law (fewer than 3 sizes, or no errors)</li>"
    est = "".join(f"<li>{html.escape(describe_estimate(t))}</li>" for t in law["targets"])
    return (
        f"<li><b>{html.escape(name)}</b>: error(n) = {law['a']:.3g}·n^−{law['b']:.3g}"
        f" + {law['c']:.3g}<ul>{est}</ul></li>"
    )


def curve_html(report: Mapping[str, Any], png: bytes) -> str:
    """``curve.html``: :func:`curve_section` as a self-contained page."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>learning curve</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:.2em .6em;text-align:right;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>Learning curve</h1>{curve_section(report, png)}</body></html>\n"
    )
