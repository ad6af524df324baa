"""One self-contained HTML report per run (or ladder): what the data was, how training went,
how good the model is (with uncertainty), where and why it fails.

The file embeds every picture as a base64 ``data:`` URI and its CSS inline; it has no script
and no external reference, so it opens offline, can be mailed or attached to a ticket, and
renders the same anywhere. Thumbnails are small JPEGs and figures 100-dpi PNGs, so a report
weighs well under a megabyte for a typical run.

Each section is built independently: one that cannot be (images moved, Grad-CAM unsupported
for the architecture, ...) says why in place and the rest of the report is still written.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.errors import TransferlabError
from transferlab.evaluation import analysis, plots
from transferlab.evaluation.metrics import expected_calibration_error, fit_temperature
from transferlab.progress import info
from transferlab.storage import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from transferlab.api import Classifier
    from transferlab.data.prepared import PreparedData, Split

__all__ = ["REPORT_FILE", "best_rung", "build_report", "load_ladder"]

REPORT_FILE = "report.html"
LADDER_FILE = "ladder.json"
THUMB_PX = 96  # dataset samples
GALLERY_PX = 144  # top losses / suspects: large enough to judge the label by eye
CAM_PX = 160  # each half of a Grad-CAM pair
_JPEG_QUALITY = 75
_MAX_THUMB_CLASSES = 40

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#263238;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cfd8dc}
nav{background:#eceff1;padding:6px 28px;position:sticky;top:0;border-bottom:1px solid #cfd8dc}
nav a{margin-right:14px;color:#37474f;text-decoration:none;font-size:13px}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:6px 18px 14px;
margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f5f5f5}
.text2 td:nth-child(2),.text2 th:nth-child(2){text-align:left}
.kv td:first-child{font-weight:600;color:#455a64}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center;font-size:12px}figure img{display:block;margin:0 auto 2px;
border-radius:3px}
figcaption{max-width:330px;word-break:break-all}
.bad{color:#c62828;font-weight:600}.ok{color:#2e7d32}.muted{color:#78909c}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px;margin:8px 0}
.unavailable{background:#ffebee;border-left:4px solid #e53935;padding:6px 10px;margin:8px 0}
img.plot{max-width:100%;height:auto}
details summary{cursor:pointer;color:#455a64}
"""


# --------------------------------------------------------------------------------------------
# small HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, mime: str, alt: str, cls: str = "", width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{_data_uri(data, mime)}" alt="{_e(alt)}"{c}{w}>'


def _fig(fig: Figure, alt: str) -> str:
    data = plots.figure_bytes(fig, "png")
    fig.clear()  # free the artists now: a report draws many figures
    return _img(data, "image/png", alt, cls="plot")


def _jpeg(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _thumbnail(path: str, px: int) -> bytes:
    from transferlab.data.images import open_rgb

    # draft decoding: a 500 px JPEG is DCT-scaled at decode time, ~5x cheaper than full size
    img = open_rgb(path, draft=(px, px))
    img.thumbnail((px, px))
    return _jpeg(np.asarray(img))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ci(m: Mapping[str, Any]) -> str:
    lo, hi = m["accuracy_ci95"]
    return f"{_pct(m['accuracy'])} <span class=muted>[{_pct(lo)} – {_pct(hi)}]</span>"


def _softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    return analysis._softmax(logits, t)


# --------------------------------------------------------------------------------------------
# the run's files


def load_ladder(ladder: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A ladder description: the dict itself, a ``ladder.json`` path or its folder."""
    if isinstance(ladder, Mapping):
        d = dict(ladder)
    else:
        p = Path(ladder)
        p = p / LADDER_FILE if p.is_dir() else p
        d = analysis.read_json(p)
        if not isinstance(d, dict):
            raise TransferlabError(f"{p}: no {LADDER_FILE}" if d is None else f"{p}: not a ladder")
        d.setdefault("_dir", str(p.parent))
    if not isinstance(d.get("rungs"), list):
        raise TransferlabError("a ladder needs a 'rungs' list")
    return d


def _val_accuracy(rung: Mapping[str, Any]) -> float | None:
    """A rung's val accuracy: the mean over seeds when it ran several, else its one run's."""
    m = rung.get("val") or {}
    seeds = m.get("across_seeds") or {}
    v = seeds.get("mean", m.get("accuracy"))
    return None if v is None else float(v)


def _by_val(ladder: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rungs with a val accuracy, best first; equal ones keep the ladder's order."""
    scored = [(acc, r) for r in ladder["rungs"] if (acc := _val_accuracy(r)) is not None]
    return [r for _, r in sorted(scored, key=lambda t: -t[0])]  # sorted() is stable


def best_rung(ladder: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ladder's best rung: highest val accuracy (the mean over seeds when a rung ran
    several), the earlier rung on a tie; None when no rung has a val accuracy.

    Chosen on val only, never on test: picking the winner by its test score would make that
    score optimistic, and the test split is what reports the chosen rung honestly. The report
    details this rung, and the CLI names it, by this one rule.
    """
    ranked = _by_val(ladder)
    return ranked[0] if ranked else None


def _best_rung_dir(ladder: Mapping[str, Any]) -> Path | None:
    """The folder of the best rung (:func:`best_rung`) still on disk; without val accuracies,
    the first rung on disk in ladder order."""
    for r in [*_by_val(ladder), *ladder["rungs"]]:
        if r.get("run_dir"):
            p = _rung_path(ladder, r["run_dir"])
            if (p / "model.json").is_file():
                return p
    return None


def _rung_path(ladder: Mapping[str, Any], run_dir: str) -> Path:
    p = Path(run_dir)
    if not p.is_absolute() and "_dir" in ladder and not p.exists():
        p = Path(ladder["_dir"]) / p  # ladder.json may store rung folders relative to itself
    return p


# --------------------------------------------------------------------------------------------
# the report


class _Report:
    """Collects sections; a section that raises is replaced by a notice saying why."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, str, str]] = []  # (id, title, html)
        self.unavailable: list[str] = []
        self.timings: dict[str, float] = {}

    def add(self, sid: str, title: str, build: Callable[[], str | None]) -> None:
        t0 = time.perf_counter()
        try:
            body = build()
        except Exception as e:  # a report must not die with one section; say what went wrong
            reason = str(e) if isinstance(e, TransferlabError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, TransferlabError) and os.environ.get("TRANSFERLAB_DEBUG"):
                traceback.print_exc()
            self.unavailable.append(f"{title}: {reason}")
            body = f'<p class="unavailable">This section is unavailable: {_e(reason)}</p>'
        self.timings[sid] = time.perf_counter() - t0
        if body is not None:
            self.sections.append((sid, title, body))


class _Context:
    """Everything sections share, loaded once (lazily where it costs something)."""

    def __init__(
        self,
        run: Path,
        data: str | os.PathLike[str] | None,
        clf: Classifier | None = None,
        prepared: PreparedData | None = None,
    ) -> None:
        import transferlab

        self.run = run
        self.data = data
        self.clf: Classifier = clf if clf is not None else transferlab.load(run)
        self._files: dict[str, Any] = {}
        self._prepared = prepared if data is not None else None
        self._prepared_error: str | None = None
        self._splits: dict[str, Split] | None = None
        self._split_error: str | None = None
        self.logits: dict[str, np.ndarray] = {}

    def _json(self, name: str, default: Any) -> Any:
        """A run file, read once; a corrupt one fails the sections that need it, not the
        whole report."""
        if name not in self._files:
            try:
                self._files[name] = analysis.read_json(self.run / name)
            except TransferlabError as e:
                self._files[name] = e
        got = self._files[name]
        if isinstance(got, TransferlabError):
            raise got
        return default if got is None else got

    @property
    def metrics(self) -> dict[str, Any]:
        return self._json("metrics.json", {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._json("history.json", [])

    @property
    def summary(self) -> dict[str, Any]:
        return self._json("data.json", {})

    @property
    def classes(self) -> list[str]:
        return self.clf.classes

    def prepared(self) -> PreparedData | None:
        """The dataset given with ``data``, scanned once for the whole report as ``fit`` scans
        (unusable files skipped); None when the report uses the run's recorded images."""
        if self.data is None:
            return None
        if self._prepared is None and self._prepared_error is None:
            try:
                self._prepared = analysis.prepare_run_data(
                    self.data, self.clf.saved.config, self.classes
                )
            except TransferlabError as e:
                self._prepared_error = str(e)
        if self._prepared is None:
            raise TransferlabError(str(self._prepared_error))
        return self._prepared

    def resolve(self, names: Sequence[str], *, digests: bool = True) -> dict[str, Split]:
        """Splits of the given ``data`` (the one scan) or of the run's own ``data.json``."""
        if self.data is not None:
            return analysis.resolve_splits(
                self.run, names, classes=self.classes, prepared=self.prepared()
            )
        return analysis.resolve_splits(self.run, names, classes=self.classes, digests=digests)

    def splits(self) -> dict[str, Split]:
        """val/test with digests (for the feature cache); raises if the images are gone."""
        if self._splits is None and self._split_error is None:
            try:
                self._splits = self.resolve(("val", "test"))
            except TransferlabError as e:
                self._split_error = str(e)
        if self._splits is None:
            raise TransferlabError(f"the run's images are not available ({self._split_error})")
        return self._splits

    def eval_split(self) -> str:
        """The split shown in detail: test when there is one, else val."""
        s = self.splits()
        if "test" in s:
            return "test"
        if "val" in s:
            return "val"
        raise TransferlabError("the run has neither a test nor a val split")

    def split_logits(self, name: str) -> np.ndarray:
        if name not in self.logits:
            self.logits[name] = analysis.split_logits(self.clf, self.splits()[name])
        return self.logits[name]

    def probs(self, name: str) -> np.ndarray:
        return _softmax(self.split_logits(name), self.clf.saved.temperature)


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    ladder: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    gradcam: int = 4,
    top_k: int = 12,
    thumbnails: int = 6,
    suspects: bool | None = None,
    write_predictions: bool = True,
    classifier: Classifier | None = None,
    prepared: PreparedData | None = None,
) -> Path:
    """Write a self-contained HTML report for a run folder and return its path.

    ``run_dir`` is a ``fit`` run folder, or a ladder folder holding ``ladder.json`` (its best
    rung by val accuracy, :func:`best_rung`, is then detailed). ``data`` re-locates the
    dataset when it moved (default: the paths in the run's ``data.json``). ``out`` defaults to
    ``run_dir/report.html``. ``ladder`` (a ``ladder.json`` path/folder or its dict) adds the
    comparison chart, table and McNemar tests against the best rung. ``gradcam`` / ``top_k`` /
    ``thumbnails`` size the galleries; ``suspects`` lists training images whose label an
    out-of-fold head disputes (default: only for runs with an unchanged pretrained body,
    whose training features are cached). With ``write_predictions`` the per-image val/test
    predictions go to ``run_dir/predictions.csv`` (used by ``compare_runs``). ``classifier``:
    the run's model already in memory (``fit`` passes its own: saves reloading the body and
    reuses its feature runtime). ``data`` is scanned as ``fit`` scans (unusable files are
    skipped and listed in the Dataset section); ``prepared``: that scan when the caller already
    has it (:func:`transferlab.evaluation.analysis.prepare_run_data` of ``data``).
    Prints the build time and size.
    """
    t0 = time.perf_counter()
    run = Path(run_dir)
    lad = None
    if ladder is not None:
        lad = load_ladder(ladder)
    elif (run / LADDER_FILE).is_file():
        lad = load_ladder(run)
    if not (run / "model.json").is_file():
        best = _best_rung_dir(lad) if lad is not None else None
        if best is None:
            raise TransferlabError(f"{run}: not a transferlab run folder (no model.json)")
        out = out if out is not None else run / REPORT_FILE
        run = best
        classifier = None  # the caller's model belongs to the folder it gave, not this rung
    out_path = Path(out) if out is not None else run / REPORT_FILE
    ctx = _Context(run, data, classifier, prepared)
    rep = _Report()

    if lad is not None:
        rep.add("ladder", "Ladder: strategies compared", lambda: _ladder_section(lad))
    rep.add("data", "Dataset", lambda: _data_section(ctx, thumbnails))
    rep.add("config", "Configuration and environment", lambda: _config_section(ctx))
    rep.add("curves", "Learning curves", lambda: _curves_section(ctx))
    rep.add("metrics", "Metrics (95% confidence intervals)", lambda: _metrics_section(ctx))
    rep.add("confusion", "Confusion matrix", lambda: _confusion_section(ctx))
    rep.add("calibration", "Calibration", lambda: _calibration_section(ctx))
    rep.add("top-losses", "Most confidently wrong", lambda: _top_losses_section(ctx, top_k))
    if suspects is None:
        suspects = not ctx.clf.saved.body.get("trained", False)
    if suspects:
        rep.add("suspects", "Possible label errors (training set)", lambda: _suspects(ctx, top_k))
    if gradcam > 0:
        rep.add(
            "gradcam",
            "Class activation maps: where the model looks",
            lambda: _gradcam_section(ctx, gradcam),
        )

    try:
        recorded = (ctx.summary.get("index") or {}).get("root")
    except TransferlabError:  # data.json is corrupt: the Dataset section says so
        recorded = None
    same_data = data is None or (
        recorded is not None and Path(data).resolve() == Path(recorded).resolve()
    )
    # predictions.csv describes the run's own test set (compare_runs pairs runs on it): never
    # overwrite it with another dataset's, and only when the sections could score the images.
    if write_predictions and same_data and ctx.logits:
        try:
            splits = ctx.splits()
            analysis.save_predictions(
                run,
                {n: (splits[n], ctx.probs(n)) for n in ("val", "test") if n in splits},
                ctx.classes,
            )
        except (TransferlabError, OSError) as e:
            rep.unavailable.append(f"predictions.csv: {e}")

    seconds = time.perf_counter() - t0
    doc = _document(ctx, rep, lad, seconds)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, doc)
    mb = out_path.stat().st_size / 1e6
    seconds = time.perf_counter() - t0
    info(f"report: {out_path} ({mb:.2f} MB, built in {seconds:.1f} s)")
    for problem in rep.unavailable:
        info(f"  [yellow]report section unavailable[/yellow] {problem}")
    return out_path


def _document(ctx: _Context, rep: _Report, lad: Mapping[str, Any] | None, seconds: float) -> str:
    saved = ctx.clf.saved
    title = f"transferlab report: {ctx.run.name}"
    if lad is not None and lad.get("_dir"):
        title = f"transferlab ladder: {Path(lad['_dir']).name} (detailed: {ctx.run.name})"
    try:
        metrics = ctx.metrics
    except TransferlabError:  # corrupt metrics.json: the Metrics section says so
        metrics = {}
    test = metrics.get("test") or metrics.get("val")
    headline = ""
    if test:
        which = "test" if "test" in metrics else "val"
        lo, hi = test["accuracy_ci95"]
        headline = (
            f"{which} accuracy {_pct(test['accuracy'])} (95% CI {_pct(lo)} – {_pct(hi)}, "
            f"n = {test['n']}) · "
        )
    sub = (
        f"{headline}{_e(saved.strategy)} on {_e(saved.body.get('spec'))} · "
        f"{len(ctx.classes)} classes · built {_dt.datetime.now():%Y-%m-%d %H:%M}"
    )
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in rep.sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(t)}</h2>{h}</section>' for sid, t, h in rep.sections
    )
    foot = (
        f'<p class="muted">Self-contained report (no external resources), built in '
        f"{seconds:.1f} s from {_e(ctx.run)}.</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{sub}</p></header><nav>{nav}</nav>"
        f"<main>{body}{foot}</main></body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# sections


def _data_section(ctx: _Context, n_thumbs: int) -> str:
    s = ctx.summary
    counts: dict[str, dict[str, int]] = s.get("counts") or {}
    if not counts:
        raise TransferlabError("the run has no data.json (it was fitted without a run folder?)")
    splits = list(counts)
    rows = [
        (
            _e(c),
            *(str(counts[sp].get(c, 0)) for sp in splits),
            str(sum(counts[sp].get(c, 0) for sp in splits)),
        )
        for c in ctx.classes
    ]
    rows.append(
        (
            "<b>total</b>",
            *(f"<b>{sum(counts[sp].values())}</b>" for sp in splits),
            f"<b>{sum(sum(v.values()) for v in counts.values())}</b>",
        )
    )
    idx = s.get("index", {})
    parts = [
        f"<p>Root <code>{_e(idx.get('root', '?'))}</code>, layout "
        f"<code>{_e(idx.get('layout', '?'))}</code>"
        + (
            " (split generated with a seed: see configuration)"
            if idx.get("generated_split")
            else ""
        )
        + "</p>",
        _table(["class", *splits, "all"], rows),
        _fig(plots.plot_class_counts(counts), "images per class and split"),
    ]
    for problem in idx.get("problems", []):
        parts.append(f'<p class="note">{_e(problem)}</p>')
    parts.append(_skipped_table("Skipped files", s.get("skipped") or []))
    dups = s.get("cross_split_duplicates") or []
    parts.append(f"<h3>Same image in two splits ({len(dups)})</h3>")
    if dups:
        parts.append(
            '<p class="note">Leakage: these test/val scores are optimistic until the copies '
            "are removed.</p>"
        )
        parts.append(_table(["file", "same content as"], [(_e(a), _e(b)) for a, b in dups[:100]]))
    else:
        parts.append("<p class=ok>None found (content hashes differ across splits).</p>")
    if ctx.data is not None:
        parts.append(_given_data(ctx))
    if n_thumbs > 0:
        parts.append(_thumbnail_grid(ctx, n_thumbs))
    return "".join(parts)


def _skipped_table(title: str, skipped: Sequence[Mapping[str, str]]) -> str:
    parts = [f"<h3>{_e(title)} ({len(skipped)})</h3>"]
    if skipped:
        parts.append(
            _table(["file", "reason"], [(_e(x["path"]), _e(x["reason"])) for x in skipped[:100]])
        )
        if len(skipped) > 100:
            parts.append(f"<p class=muted>… and {len(skipped) - 100} more</p>")
    else:
        parts.append("<p class=ok>None: every file decoded.</p>")
    return "".join(parts)


def _given_data(ctx: _Context) -> str:
    """The folder given with ``data``: what the sections below scored, and what was skipped."""
    prepared = ctx.prepared()
    if prepared is None:
        return ""
    counts = {n: len(sp) for n, sp in prepared.splits.items()}
    text = ", ".join(f"{n} {k}" for n, k in counts.items())
    return (
        f"<h3>Evaluated on <code>{_e(prepared.index.root)}</code></h3>"
        f"<p>The images below (calibration, galleries, Grad-CAM) come from this folder, split "
        f"with the run's seed and fractions: {_e(text)} images. Metrics and the confusion "
        "matrix are the run's own, recorded at fit time.</p>"
        + _skipped_table(f"Skipped files in {prepared.index.root}", prepared.summary()["skipped"])
    )


def _thumbnail_grid(ctx: _Context, n: int) -> str:
    sp = ctx.resolve(("train",), digests=False).get("train")
    if sp is None:
        return ""
    rng = np.random.default_rng(0)  # the same samples every time the report is rebuilt
    out = ["<h3>Samples per class (training set)</h3>"]
    # Many classes: fewer samples each, and at most _MAX_THUMB_CLASSES classes, so that the
    # report stays a few MB and builds in seconds on 1000-class data too.
    n = min(n, max(2, 120 // max(1, len(ctx.classes))))
    if len(ctx.classes) > _MAX_THUMB_CLASSES:
        out.append(f"<p class=muted>First {_MAX_THUMB_CLASSES} of {len(ctx.classes)} classes.</p>")
    for ci, c in enumerate(ctx.classes[:_MAX_THUMB_CLASSES]):
        members = np.flatnonzero(sp.labels == ci)
        pick = rng.choice(members, size=min(n, len(members)), replace=False) if len(members) else []
        figs = []
        for i in sorted(pick):
            p = sp.paths[i]
            figs.append(
                f"<figure>{_img(_thumbnail(p, THUMB_PX), 'image/jpeg', Path(p).name)}"
                f"<figcaption>{_e(Path(p).name)}</figcaption></figure>"
            )
        out.append(f"<p><b>{_e(c)}</b></p><div class=gallery>{''.join(figs)}</div>")
    return "".join(out)


def _config_section(ctx: _Context) -> str:
    from transferlab.system import library_versions

    saved = ctx.clf.saved
    cfg = saved.config
    head = saved.head
    pre = saved.preprocess
    key = [
        ("backbone", saved.body.get("spec")),
        ("pretrained", cfg.get("pretrained")),
        ("body trained", bool(saved.body.get("trained", False))),
        ("strategy", saved.strategy),
        ("head", head.get("kind")),
        ("seed", cfg.get("seed")),
        (
            "input",
            f"{pre.input_size[0]}×{pre.input_size[1]}, {pre.interpolation}, crop {pre.crop_pct:g}",
        ),
        (
            "temperature",
            f"{saved.temperature:.3f}" + (" (calibrated)" if saved.temperature != 1.0 else ""),
        ),
    ]
    if head.get("kind") == "linear" and "l2" in head:
        key.append(
            ("L2 (selected on " + str(head.get("l2_source", "?")) + ")", f"{head['l2']:.3g}")
        )
    info_ = ctx.metrics.get("info") or {}
    for k in ("trainable_params", "epochs", "best_epoch"):
        if k in info_:
            key.append((k.replace("_", " "), info_[k]))
    timings = ctx.metrics.get("timings") or {}
    if "total_s" in timings:
        key.append(("fit time", f"{timings['total_s']:.1f} s"))
    trained_v = saved.versions or {}
    now_v = library_versions()
    vrows = [
        (_e(k), _e(trained_v.get(k, "–")), _e(now_v.get(k, "–")))
        for k in sorted(set(trained_v) | set(now_v))
    ]
    parts = [
        _kv(key),
        "<h3>Library versions</h3>",
        _table(["library", "trained with", "report built with"], vrows),
        "<details><summary>Full configuration</summary>",
        _kv(sorted(cfg.items())),
        "</details>",
    ]
    if timings:
        parts.append("<details><summary>Timings</summary>")
        parts.append(
            _kv([(k, f"{v:.2f} s") for k, v in timings.items() if isinstance(v, int | float)])
        )
        parts.append("</details>")
    return "".join(parts)


def _curves_section(ctx: _Context) -> str:
    h = ctx.history
    if not h:
        return "<p class=muted>No training history was recorded for this run.</p>"
    grid = "epoch" not in h[0] and "l2" in h[0]
    text = (
        "<p>A linear head has no epochs: it is fitted once per L2 strength and the strength "
        "with the lowest validation loss is kept (dashed line). Left of it the head overfits "
        "(train ≫ val), right of it it underfits.</p>"
        if grid
        else "<p>Train vs val per epoch: a widening gap is overfitting; both flat and low is "
        "underfitting.</p>"
    )
    return text + _fig(plots.plot_learning_curves(h), "learning curves")


def _report_rows(m: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            "accuracy [95% CI]",
            _ci(m) + f" <span class=muted>({m.get('ci_method', 'wilson')})</span>",
        ),
        ("balanced accuracy", _pct(m.get("balanced_accuracy"))),
        ("macro F1", f"{m.get('macro_f1', float('nan')):.3f}"),
        ("log loss", f"{m.get('log_loss', float('nan')):.3f}"),
        ("ECE (15 bins)", f"{m.get('ece', float('nan')):.3f}"),
        ("n", str(m.get("n"))),
    ]
    if m.get("roc_auc") is not None:
        rows.insert(3, ("ROC AUC", f"{m['roc_auc']:.3f}"))
    for k, v in (m.get("top_k_accuracy") or {}).items():
        rows.insert(2, (f"top-{k} accuracy", _pct(v)))
    return rows


def _metrics_section(ctx: _Context) -> str:
    parts = []
    for name in ("val", "test"):
        m = ctx.metrics.get(name)
        if not m:
            continue
        parts.append(f"<h3>{name} (n = {m['n']})</h3>")
        parts.append(_table(["metric", "value"], _report_rows(m)))
        pc = m.get("per_class") or {}
        parts.append(
            _table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    (
                        _e(c),
                        f"{r['precision']:.3f}",
                        f"{r['recall']:.3f}",
                        f"{r['f1']:.3f}",
                        str(r["support"]),
                    )
                    for c, r in pc.items()
                ],
            )
        )
    if not parts:
        raise TransferlabError("metrics.json has no val/test results")
    tta = ctx.metrics.get("tta")
    if tta:
        parts.append(f"<h3>Test-time augmentation ({_e(tta['split'])}, {tta['views']} views)</h3>")
        parts.append(
            _table(
                ["", "accuracy [95% CI]", "log loss", "ECE"],
                [
                    (name, _ci(tta[key]), f"{tta[key]['log_loss']:.3f}", f"{tta[key]['ece']:.3f}")
                    for name, key in (("plain", "plain"), (_e(tta["mode"]), "tta"))
                ],
            )
        )
    if ctx.clf.saved.temperature != 1.0:
        parts.append(
            '<p class="note">These numbers were recorded at fit time, before the temperature '
            f"T = {ctx.clf.saved.temperature:.3f} was set: accuracy and the confusion matrix are "
            "unchanged by it; for log loss and ECE after it, see Calibration.</p>"
        )
    n = (ctx.metrics.get("test") or ctx.metrics.get("val"))["n"]
    parts.append(
        f'<p class="muted">The interval is where the true accuracy lies with 95% confidence '
        f"given only {n} images: differences between models smaller than its width are not "
        f"evidence (use <code>transferlab compare</code> for a paired test).</p>"
    )
    return "".join(parts)


def _confusion_section(ctx: _Context) -> str:
    name = "test" if "test" in ctx.metrics else "val"
    m = ctx.metrics.get(name)
    if not m:
        raise TransferlabError("metrics.json has no confusion matrix")
    cm = m["confusion_matrix"]
    mc = analysis.most_confused(cm, ctx.classes, k=10)
    parts = [
        f"<p>On the {name} split; rows are the true class, the right panel is recall per "
        "class.</p>",
        _fig(plots.plot_confusion(cm, ctx.classes), f"{name} confusion matrix"),
    ]
    if mc:
        parts.append("<h3>Most confused pairs</h3>")
        parts.append(
            _table(["true", "predicted as", "images"], [(_e(a), _e(b), str(k)) for a, b, k in mc])
        )
    else:
        parts.append("<p class=ok>No mistakes.</p>")
    return "".join(parts)


def _calibration_section(ctx: _Context) -> str:
    name = ctx.eval_split()
    y = ctx.splits()[name].labels
    t = ctx.clf.saved.temperature
    raw = _softmax(ctx.split_logits(name))
    parts = []
    if t != 1.0:
        fig = plots.plot_reliability(
            raw,
            y,
            calibrated=_softmax(ctx.split_logits(name), t),
            temperature=t,
            title=f"reliability on {name}: before / after temperature scaling",
        )
        parts.append(
            f"<p>The model carries a temperature T = {t:.3f} (fitted on val): its probabilities "
            "are <code>softmax(logits / T)</code>.</p>"
        )
    else:
        fig = plots.plot_reliability(raw, y, title=f"reliability on {name}")
    parts.append(
        "<p>Of the images predicted with confidence ≈ p, a fraction ≈ p should be right: points "
        "below the diagonal are overconfident. ECE is the count-weighted mean gap.</p>"
    )
    parts.append(_fig(fig, f"reliability diagram ({name})"))
    cal = ctx.metrics.get("calibration")
    if cal:
        rows = [
            (
                _e(s),
                str(cal[s]["n"]),
                f"{cal[s]['ece_before']:.4f}",
                f"{cal[s]['ece_after']:.4f}",
                f"{cal[s]['nll_before']:.4f}",
                f"{cal[s]['nll_after']:.4f}",
            )
            for s in ("val", "test")
            if s in cal
        ]
        parts.append(f"<h3>Temperature scaling (T = {cal['temperature']:.3f}, fitted on val)</h3>")
        parts.append(
            _table(
                ["split", "n", "ECE before", "ECE after", "log loss before", "log loss after"], rows
            )
        )
    elif t == 1.0 and "val" in ctx.splits() and name == "test":
        # What calibration would do, without changing the model: T from val, scored on test.
        tv = fit_temperature(ctx.split_logits("val"), ctx.splits()["val"].labels)
        before = expected_calibration_error(raw, y)
        after = expected_calibration_error(_softmax(ctx.split_logits(name), tv), y)
        verdict = "lowers" if after < before else "does not lower"
        parts.append(
            f'<p class="note">Temperature scaling fitted on val would give T = {tv:.3f}; on test '
            f"it {verdict} ECE: {before:.4f} → {after:.4f}. Not applied: "
            "<code>transferlab evaluate RUN DATA --calibrate</code> stores it in the model.</p>"
        )
    return "".join(parts)


def _gallery(ctx: _Context, rows: Sequence[Mapping[str, Any]], px: int) -> str:
    figs = []
    for r in rows:
        p = r["path"]
        cap = (
            f"<b>true</b> {_e(r['label'])} · <b class=bad>pred</b> {_e(r['predicted'])} "
            f"({r['p_pred']:.2f})<br><span class=muted>p(true) {r['p_true']:.3f} · "
            f"{_e(Path(p).name)}</span>"
        )
        figs.append(
            f"<figure>{_img(_thumbnail(p, px), 'image/jpeg', Path(p).name)}"
            f"<figcaption>{cap}</figcaption></figure>"
        )
    return f"<div class=gallery>{''.join(figs)}</div>"


def _top_losses_section(ctx: _Context, k: int) -> str:
    name = ctx.eval_split()
    split = ctx.splits()[name]
    rows = analysis.top_losses(ctx.probs(name), split.labels, split.paths, k, classes=ctx.classes)
    if not rows:
        return f"<p class=ok>No mistakes on the {name} split.</p>"
    return (
        f"<p>The {len(rows)} {name} images with the highest loss (−log p(true class)), worst "
        "first: mislabelled images, ambiguous pictures and systematic blind spots show up "
        "here.</p>" + _gallery(ctx, rows, GALLERY_PX)
    )


def _suspects(ctx: _Context, k: int) -> str:
    train = ctx.resolve(("train",)).get("train")
    if train is None:
        raise TransferlabError("no training split")
    probs = analysis.train_out_of_fold_probs(ctx.clf, train, folds=5, seed=0)
    rows = analysis.suspect_labels(probs, train.labels, train.paths, k, classes=ctx.classes)
    text = (
        "<p>Training images that a linear head trained on the <i>other</i> folds (5-fold, "
        "the run's L2) confidently assigns to another class. Some are label errors, some hard "
        "cases; check them by eye.</p>"
    )
    if not rows:
        return text + "<p class=ok>None: every training label is supported out of fold.</p>"
    return text + _gallery(ctx, rows, GALLERY_PX)


def _gradcam_section(ctx: _Context, n: int) -> str:
    from PIL import Image

    from transferlab.data.images import load_image
    from transferlab.evaluation import explain

    name = ctx.eval_split()
    split = ctx.splits()[name]
    probs = ctx.probs(name)
    pred = probs.argmax(axis=1)
    wrong = [r["index"] for r in analysis.top_losses(probs, split.labels, split.paths, n // 2)]
    right = np.flatnonzero(pred == split.labels)
    right = right[np.argsort(-probs[right].max(axis=1), kind="stable")]
    chosen = wrong + [int(i) for i in right[: n - len(wrong)]]
    if not chosen:
        return "<p class=muted>No images to explain.</p>"
    saved = ctx.clf.saved
    pre = saved.preprocess
    size = (int(pre.input_size[0]), int(pre.input_size[1]))
    images = np.stack([load_image(split.paths[i], pre) for i in chosen])
    # The layer choice traces one dummy forward pass: at the model's own input size, the only
    # one a fixed-size model (the scratch CNNs: Flatten + Dense) can take.
    layer, _ = explain.find_target_layer(saved.net, size)
    x = explain.normalize(images, pre.mean, pre.std)
    cams, used = explain.grad_cam(saved.net, x, target_layer=layer, input_size=size)
    figs = []
    for j, i in enumerate(chosen):
        overlay = explain.overlay_cam(images[j], cams[j])
        pair = np.concatenate([images[j].transpose(1, 2, 0), overlay], axis=1)
        img = Image.fromarray(pair)
        img = img.resize((2 * CAM_PX, round(CAM_PX * pair.shape[0] / pair.shape[1] * 2)))
        ok = pred[i] == split.labels[i]
        src = Path(split.paths[i])
        cap = (
            f"true {_e(ctx.classes[split.labels[i]])} · "
            f"<b class={'ok' if ok else 'bad'}>pred {_e(ctx.classes[pred[i]])}</b> "
            f"({probs[i, pred[i]]:.2f}) · CAM for {_e(ctx.classes[int(used[j])])}<br>"
            f"<span class=muted>{_e(Path(split.paths[i]).name)}</span>"
        )
        figs.append(
            f"<figure>{_img(_jpeg(np.asarray(img)), 'image/jpeg', 'CAM ' + src.name)}"
            f"<figcaption>{cap}</figcaption></figure>"
        )
    return (
        f"<p>Image | class activation map (HiResCAM, the gradient &times; activation variant "
        f"of Grad-CAM) of the predicted class at <code>{_e(layer)}</code> (for a CNN the last "
        f"stage at stride &le; {explain.DEFAULT_CAM_STRIDE}; red = most evidence), for the "
        f"{len(wrong)} worst mistakes "
        f"and the {len(chosen) - len(wrong)} most confident correct {name} images. A model that is "
        "right for the wrong reason looks at the background.</p>"
        f"<div class=gallery>{''.join(figs)}</div>"
    )


def _ladder_section(lad: Mapping[str, Any]) -> str:
    rungs = lad["rungs"]
    if not rungs:
        raise TransferlabError("the ladder has no rungs")

    def acc(r: Mapping[str, Any], split: str) -> str:
        m = r.get(split)
        if not m or m.get("accuracy") is None:
            return "–"
        seeds = m.get("across_seeds")
        if seeds:  # several seeds: the spread over seeds says more than one run's CI
            return (
                f"{_pct(seeds['mean'])} ± {_pct(seeds['sd'])} "
                f"<span class=muted>(sd over {len(r.get('runs') or []) or '?'} seeds)</span>"
            )
        return _ci(m)

    rows = []
    for r in rungs:
        secs = r.get("seconds")
        params = r.get("trainable_params")
        rows.append(
            (
                _e(r.get("name", "?")),
                _e(r.get("description", "")),
                acc(r, "val"),
                acc(r, "test"),
                "–" if secs is None else f"{float(secs):.1f}",
                "–" if r.get("epochs") is None else _e(r["epochs"]),
                "–" if params is None else f"{int(params):,}",
            )
        )
    parts = [
        _fig(plots.plot_compare(rungs, title="accuracy per rung (95% CI)"), "ladder comparison"),
        _table(
            [
                "rung",
                "what",
                "val accuracy",
                "test accuracy",
                "seconds",
                "epochs",
                "trainable params",
            ],
            rows,
            cls="text2",
        ),
    ]
    dirs = [(r.get("name"), _rung_path(lad, r["run_dir"])) for r in rungs if r.get("run_dir")]
    dirs = [(n, d) for n, d in dirs if (d / "model.json").is_file()]
    if len(dirs) >= 2:
        cmp = analysis.compare_runs([d for _, d in dirs])
        if cmp["mcnemar"]:
            label = {row["name"]: n for (n, _), row in zip(dirs, cmp["runs"], strict=True)}
            prows = [
                (
                    _e(label.get(p["a"], p["a"])),
                    _e(label.get(p["b"], p["b"])),
                    str(p["only_a_correct"]),
                    str(p["only_b_correct"]),
                    f"<span class={'bad' if p['p_value'] < 0.05 else 'muted'}>"
                    f"{p['p_value']:.3g}</span>",
                )
                for p in cmp["mcnemar"]
            ]
            parts.append("<h3>Paired test (McNemar) on the shared test images</h3>")
            parts.append(
                _table(["A", "B", "only A right", "only B right", "p-value"], prows, "text2")
            )
            parts.append(
                "<p class=muted>p &lt; 0.05 (red): the two rungs' accuracies differ beyond chance; "
                "above it, the data cannot tell them apart.</p>"
            )
        else:
            parts.append(f"<p class=muted>{_e(cmp['note'])}</p>")
    return "".join(parts)


def write_report(run_dir: str | os.PathLike[str], **kwargs: Any) -> Path | None:
    """``build_report`` for callers that just trained something: a report problem becomes a
    one-line warning, because it must never fail (or lose) a finished training."""
    from transferlab.progress import warn

    try:
        return build_report(run_dir, **kwargs)
    except TransferlabError as e:
        warn(f"no report.html in {run_dir}: {e}")
        return None
