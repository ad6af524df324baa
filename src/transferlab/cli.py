"""The ``transferlab`` command line: a few lines per command over the Python API."""

from __future__ import annotations

import inspect
import shlex
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from inspect import Parameter
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.table import Table

from transferlab.config import DEFAULT_BACKBONE, FitConfig
from transferlab.errors import TransferlabError
from transferlab.progress import console, out_console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn a folder of labelled images into an evaluated classifier by transfer learning.",
)


def _print_version(value: bool) -> None:
    if value:
        from transferlab import __version__

        out_console.print(f"transferlab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version."
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="Results and errors only: no progress, no info lines "
        "(also after the command: `transferlab fit DATA -q`).",
    ),
) -> None:
    """Turn a folder of labelled images into an evaluated classifier by transfer learning."""


QUIET_FLAGS = ("-q", "--quiet")


def _take_quiet(argv: list[str]) -> list[str]:
    """``-q/--quiet`` anywhere before ``--`` (as pip and git take their global flags): set
    TRANSFERLAB_QUIET (scan workers and DDP ranks inherit it) and drop it from argv."""
    import os

    end = argv.index("--") if "--" in argv else len(argv)
    if not any(a in QUIET_FLAGS for a in argv[:end]):
        return argv
    os.environ["TRANSFERLAB_QUIET"] = "1"
    return [a for a in argv[:end] if a not in QUIET_FLAGS] + argv[end:]


Command = TypeVar("Command", bound=Callable[..., Any])
KEYWORD_ONLY = Parameter.KEYWORD_ONLY


def main() -> None:
    """Console entry point: user errors become one line on stderr, never a traceback."""
    import faulthandler
    import gc

    faulthandler.enable()  # a crash in native code (decoder, runtime) still says where
    # torch & co. bring ~1M long-lived objects; each full collection scans them all (7 of them,
    # 0.7 s, in a 5 s warm re-fit). Full collections after 100 middle ones instead of 10, and
    # none at exit (frozen objects are not scanned): the young generations still run as usual.
    gc.set_threshold(*gc.get_threshold()[:2], 100)
    try:
        app(args=_take_quiet(sys.argv[1:]))
    except TransferlabError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as e:
        # typer turns Ctrl-C inside a command into a silent exit 130
        if isinstance(e, SystemExit) and e.code != 130:
            raise
        console.print(interrupted_hint(sys.argv[1:]), highlight=False, soft_wrap=True)
        sys.exit(130)
    finally:
        gc.freeze()


def interrupted_hint(args: list[str]) -> str:
    """What to type next after Ctrl-C: the same command with --resume where that continues it."""
    command = args[0] if args else ""
    strategy = next(
        (v for k, v in zip(args, args[1:], strict=False) if k == "--strategy"),
        next((a.split("=", 1)[1] for a in args if a.startswith("--strategy=")), "features"),
    )
    again = "transferlab " + shlex.join(args)
    if command == "fit" and strategy == "features":
        return f"interrupted — run it again (extracted features are cached): {again}"
    resumable = command == "fit" or (
        command == "predict" and any(a in ("-o", "--out", "--output") for a in args)
    )
    if resumable and "--resume" not in args:
        return f"interrupted — resume with: {again} --resume"
    return "interrupted"


def _print_counts(counts: dict[str, dict[str, int]], title: str) -> None:
    classes = sorted({c for per in counts.values() for c in per})
    out_console.print(f"[bold]{title}[/bold]", highlight=False)
    table = Table()
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in classes:
        table.add_row(c, *(str(counts[s].get(c, 0)) for s in counts))
    table.add_row("total", *(str(sum(counts[s].values())) for s in counts), style="bold")
    out_console.print(table)


def _print_metrics(metrics: dict[str, Any], classes: list[str]) -> None:
    from transferlab.evaluation.metrics import format_report_table

    for name in ("val", "test"):
        if name in metrics:
            out_console.print(format_report_table(metrics[name], classes, title=name))


@app.command()
def split(
    source: Path = typer.Argument(..., help="Raw images: class folders, a flat folder or a CSV."),
    dest: Path = typer.Argument(..., help="New folder to create: DEST/{train,val,test}/<class>/."),
    per_class: str | None = typer.Option(None, help="Images per class, e.g. 350,150,150."),
    fractions: str | None = typer.Option(None, help="Fractions per split, e.g. 0.7,0.15,0.15."),
    seed: int = typer.Option(42, help="Seed of the stratified sampling."),
    link: bool = typer.Option(False, help="Hard-link instead of copying (same filesystem)."),
    label_regex: str | None = typer.Option(None, help="Label from file names (flat folders)."),
) -> None:
    """Stratified, seeded sampling into a new train/val/test tree (the source is never touched)."""
    from transferlab.data.split import split_folder

    if (per_class is None) == (fractions is None):
        raise TransferlabError("give exactly one of --per-class or --fractions")
    try:
        pc = [int(v) for v in per_class.split(",")] if per_class else None
        fr = [float(v) for v in fractions.split(",")] if fractions else None
    except ValueError as e:
        raise TransferlabError(f"--per-class/--fractions take comma-separated numbers ({e})") from e
    counts = split_folder(
        source, dest, per_class=pc, fractions=fr, seed=seed, link=link, label_regex=label_regex
    )
    _print_counts(counts, f"{dest}")


def config_options(*names: str, **defaults: Any) -> Callable[[Command], Command]:
    """Add ``FitConfig`` fields as options of a command, with the field's default and help text
    (``names``: which fields, default all; ``defaults``: the command's own defaults). The command
    receives them as keyword arguments: ``FitConfig.from_dict(options)``."""

    def decorate(command: Command) -> Command:
        sig = inspect.signature(command)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = typing.get_type_hints(FitConfig)
        added = []
        for f in fields(FitConfig):
            if names and f.name not in names:
                continue
            default = defaults.get(f.name, f.default)
            # Lightning takes a count or a word ("auto"): typer has no int | str option type
            text = f.name in ("devices", "time_budget")  # a count or a word; seconds or 10m
            kind = str | None if f.name == "time_budget" else str if text else hints[f.name]
            default = str(default) if f.name == "devices" else default
            option = typer.Option(default, help=f.metadata["help"])
            added.append(inspect.Parameter(f.name, KEYWORD_ONLY, default=option, annotation=kind))
        command.__signature__ = sig.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        return command

    return decorate


def _config(options: dict[str, Any]) -> FitConfig:
    devices = options.get("devices")
    if isinstance(devices, str) and devices.isdigit():
        options = {**options, "devices": int(devices)}
    return FitConfig.from_dict(options)


@app.command()
@config_options()
def fit(
    data: Path = typer.Argument(..., help="Images: split folders, class folders, flat or CSV."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run folder to write."),
    **options: Any,
) -> None:
    """Train on DATA and evaluate on its val/test splits; writes OUT/ (model, metrics.json)."""
    cfg = _config(options)
    import transferlab
    from transferlab.system import is_rank_zero

    clf = transferlab.fit(data, out=out, config=cfg)
    if not is_rank_zero():
        return  # rank 0 reports; the others trained alongside it
    from transferlab.evaluation.report import write_report

    write_report(out, classifier=clf)
    if cfg.track:
        from transferlab.tracking import attach_report

        attach_report(out)  # the report is written after fit logged the run
    _print_counts(clf.data_summary["counts"], f"{data}")
    _print_metrics(clf.metrics, clf.classes)
    t = clf.metrics["timings"]
    ext = clf.metrics.get("extraction", [])
    computed = sum(e["computed"] for e in ext)
    hits = sum(e["cache_hits"] for e in ext)
    chosen = f"{clf.saved.strategy} on {clf.saved.body['spec']}"
    line = f"{'auto → ' if cfg.strategy == 'auto' else ''}{chosen}: {t['total_s']:.1f} s"
    if ext:
        engines = sorted({e["engine"] for e in ext})
        secs = sum(e["extract_s"] for e in ext)
        rate = f", {computed / secs:.0f} img/s" if computed and secs else ""
        line += f" (features: {computed} computed{rate} on {'/'.join(engines)}, {hits} cached)"
    out_console.print(line)
    if "test" in clf.metrics:
        m = clf.metrics["test"]
        lo, hi = m["accuracy_ci95"]
        out_console.print(
            f"test accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}–{hi:.4f}, n={m['n']})"
        )
    out_console.print(f"saved to {out}/")


@app.command()
def backbones(
    filter: str | None = typer.Option(None, "--filter", "-f", help="Substring, e.g. mobilenet."),
    weights_dir: list[Path] = typer.Option([], help="Extra folders holding local-dir models."),
    offline: bool = typer.Option(
        False, "--offline", "--offline-only", help="Only those usable without a network."
    ),
    limit: int = typer.Option(50, help="Rows to show (0: all); parameter counts cost a build."),
    add_weights_dir: Path | None = typer.Option(
        None, help="Record DIR on the weights search path: its folders resolve by name anywhere."
    ),
) -> None:
    """Pretrained backbones: local weight folders (offline) first, then timm's pretrained tags."""
    from transferlab.backbones import list_backbones, with_params
    from transferlab.backbones.search import add_weights_dir as record

    if add_weights_dir is not None:
        out_console.print(f"recorded {add_weights_dir.resolve()} in {record(add_weights_dir)}")
    infos = list_backbones(filter, weights_dirs=weights_dir)
    if offline:
        infos = [i for i in infos if i.offline]
    shown = with_params(infos[:limit] if limit > 0 else infos)
    table = Table(title=f"{len(infos)} backbones" + (f" matching '{filter}'" if filter else ""))
    for col, justify in (("spec (--backbone)", "left"), ("params", "right"), ("input", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for col in ("pretrained", "offline", "source"):
        table.add_column(col, overflow="fold")
    for i in shown:
        params = f"{i.params / 1e6:.1f}M" if i.params else "?"
        size = "×".join(map(str, i.input_size)) if i.input_size else "?"
        table.add_row(
            i.name, params, size, "yes" if i.pretrained else "no", "yes" if i.offline else "",
            i.source,
        )  # fmt: skip
    out_console.print(table)
    if len(shown) < len(infos):
        out_console.print(f"… {len(infos) - len(shown)} more: --limit 0 shows all")


@app.command()
@config_options(
    "backbone", "seed", "cache_dir", "workers", "accelerator", "precision", "track", "overwrite"
)
def ladder(
    data: Path = typer.Argument(..., help="Images (any layout `fit` accepts)."),
    out: Path = typer.Option(
        Path("runs/ladder"), "--out", "-o", help="Folder for every rung and the summary."
    ),
    rungs: str | None = typer.Option(None, help="Comma-separated subset of the rungs."),
    seeds: int = typer.Option(1, help="Repeat each rung with N seeds: mean ± sd."),
    quick: bool = typer.Option(False, help="Small budgets: the whole ladder in minutes."),
    **options: Any,
) -> None:
    """The tutorial's comparison: scratch CNNs vs frozen features vs fine-tuning, same splits."""
    cfg = _config(options)
    from transferlab.ladder import ladder as run_ladder
    from transferlab.ladder import markdown_table

    names = [r.strip() for r in rungs.split(",")] if rungs else None
    report = run_ladder(data, out=out, rungs=names, seeds=seeds, quick=quick, config=cfg)
    out_console.print(markdown_table(report), highlight=False, soft_wrap=True)
    from transferlab.evaluation.report import best_rung

    best = best_rung(report)
    out_console.print(
        f"best rung on val: {best['name'] if best else '–'}; written to {out}/ "
        "(ladder.json, ladder.md, ladder.png, report.html)"
    )


@app.command("lr-find")
@config_options("backbone", "strategy", "unfreeze", "seed", "cache_dir", strategy="finetune")
def lr_find(
    data: Path = typer.Argument(..., help="Images (any layout `fit` accepts)."),
    out: Path = typer.Option(
        Path("lr_find.png"), "--out", "-o", help="Where to save the loss-vs-LR plot."
    ),
    **options: Any,
) -> None:
    """LR range test on the network the strategy would train; the model is restored after."""
    cfg = _config(options).validate()
    from transferlab.data.prepared import prepare_data
    from transferlab.lr_find import lr_find_strategy
    from transferlab.strategies import strategy_context

    result = lr_find_strategy(strategy_context(prepare_data(data, cfg), cfg, out.parent), out)
    for name, lr in result["suggestions"].items():
        out_console.print(f"{name:>8}: {'–' if lr is None else f'{lr:.2e}'}")
    out_console.print(f"plot saved to {out}")


@app.command("augment-preview")
def augment_preview(
    image: Path = typer.Argument(..., help="One image."),
    preset: str = typer.Option(
        "tutorial", "--augment", "--preset", help="none | tutorial | light | strong"
    ),
    n: int = typer.Option(5, "-n", "--n", help="How many augmented views."),
    out: Path = typer.Option(Path("augment_preview.png"), "--out", "-o"),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Its preprocessing sets size and crop."),
    seed: int = typer.Option(0),
) -> None:
    """The original and N augmented versions of one image, side by side (a PNG grid)."""
    from transferlab.augment import augment_preview as preview
    from transferlab.backbones import create_backbone

    pre = create_backbone(backbone).preprocess
    path = preview(image, preset, n, out, pre, seed=seed)
    out_console.print(f"saved {path}")


from transferlab.cli_choose import register as _register_choose  # noqa: E402
from transferlab.cli_runs import register as _register_runs  # noqa: E402
from transferlab.cli_scale import register as _register_scale  # noqa: E402
from transferlab.cli_see import register as _register_see  # noqa: E402
from transferlab.cli_ship import register as _register_ship  # noqa: E402

_register_see(app)
_register_ship(app)
_register_runs(app)
_register_choose(app)
_register_scale(app)
