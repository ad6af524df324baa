"""The ``transferlab`` command line: a few lines per command over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.config import DEFAULT_BACKBONE, FitConfig
from transferlab.errors import TransferlabError
from transferlab.progress import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a folder of labelled images into an evaluated classifier by transfer learning.",
)

out_console = console.__class__()  # stdout, for results that users pipe


def main() -> None:
    """Console entry point: user errors become one line on stderr, never a traceback."""
    try:
        app()
    except TransferlabError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


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


@app.command()
def fit(
    data: Path = typer.Argument(..., help="Images: split folders, class folders, flat or CSV."),
    out: Path = typer.Option(Path("runs/latest"), help="Run folder to write."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="timm spec or local-dir:PATH."),
    strategy: str = typer.Option("features", help="features | frozen | finetune | scratch-…"),
    head: str = typer.Option("linear", help="linear | mlp"),
    seed: int = typer.Option(42),
    class_weight: str | None = typer.Option(None, help="'auto': inverse class frequency."),
    label_regex: str | None = typer.Option(None, help="Label = first group of this regex."),
    val_fraction: float = typer.Option(0.2, help="Carved from train when there is no val."),
    test_fraction: float = typer.Option(0.2, help="Carved from train when there is no test."),
    strict: bool = typer.Option(False, help="Fail on any unusable image instead of skipping."),
    engine: str = typer.Option("auto", help="Frozen base runtime: auto|openvino|onnxruntime|torch"),
    cache_dir: str | None = typer.Option(None, help="Feature cache (default: user cache dir)."),
    batch_size: int = typer.Option(32),
    workers: int | None = typer.Option(None, help="Decode processes (default: all cores)."),
    pretrained: bool = typer.Option(True, help="--no-pretrained: random init."),
    epochs: int | None = typer.Option(None, help="Training epochs (end-to-end strategies)."),
    lr: float | None = typer.Option(None, help="Learning rate (head; body gets lr × lr-mult)."),
    augment: str | None = typer.Option(None, help="none | tutorial | light | strong"),
    unfreeze: str = typer.Option("2", help="finetune: top stages to unfreeze, or 'all'."),
    lr_mult: float = typer.Option(0.1, help="finetune: body LR multiplier."),
    bn: str = typer.Option("frozen", help="BatchNorm policy: frozen | train"),
    max_time: float | None = typer.Option(None, help="Training time budget in seconds."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/last.ckpt."),
) -> None:
    """Train on DATA and evaluate on its val/test splits; writes OUT/ (model, metrics.json)."""
    import transferlab

    cfg = FitConfig(
        backbone=backbone,
        pretrained=pretrained,
        strategy=strategy,
        head=head,
        seed=seed,
        class_weight=class_weight,
        label_regex=label_regex,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        strict=strict,
        engine=engine,
        cache_dir=cache_dir,
        batch_size=batch_size,
        workers=workers,
        epochs=epochs,
        lr=lr,
        augment=augment,
        unfreeze=unfreeze,
        lr_mult=lr_mult,
        bn=bn,
        max_time=max_time,
        resume=resume,
    )
    clf = transferlab.fit(data, out=out, config=cfg)
    _print_counts(clf.data_summary["counts"], f"{data}")
    _print_metrics(clf.metrics, clf.classes)
    t = clf.metrics["timings"]
    ext = clf.metrics.get("extraction", [])
    computed = sum(e["computed"] for e in ext)
    hits = sum(e["cache_hits"] for e in ext)
    line = f"{strategy} on {backbone}: {t['total_s']:.1f} s"
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
def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by `fit`."),
    data: Path = typer.Argument(..., help="The dataset to evaluate on."),
    split: str = typer.Option("test", help="train | val | test"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics here."),
) -> None:
    """Accuracy with 95% CI, balanced accuracy, per-class P/R/F1 and the confusion matrix."""
    import transferlab

    clf = transferlab.load(run)
    report = clf.evaluate(data, split=split)
    _print_metrics({"test" if split == "test" else "val": report} | {}, clf.classes)
    table = Table(title="confusion matrix (rows: true)")
    table.add_column("")
    for c in clf.classes:
        table.add_column(c, justify="right")
    for c, row in zip(clf.classes, report["confusion_matrix"], strict=True):
        table.add_row(c, *map(str, row))
    out_console.print(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


@app.command()
def backbones(
    filter: str | None = typer.Option(None, "--filter", "-f", help="Substring, e.g. mobilenet."),
    weights_dir: list[Path] = typer.Option([], help="Extra folders holding local-dir models."),
    offline_only: bool = typer.Option(False, help="Only those usable without a network."),
) -> None:
    """List timm architectures; marks those whose weights are available without a network."""
    from transferlab.backbones import list_backbones

    dirs = list(weights_dir)
    shared = Path("../shared/weights")
    if shared.is_dir():
        dirs.append(shared)
    infos = list_backbones(filter, weights_dirs=dirs)
    if offline_only:
        infos = [i for i in infos if i.offline]
    table = Table(title=f"{len(infos)} backbones" + (f" matching '{filter}'" if filter else ""))
    table.add_column("spec (--backbone)")
    table.add_column("pretrained")
    table.add_column("offline")
    table.add_column("source")
    for i in infos:
        table.add_row(i.name, "yes" if i.pretrained else "no", "yes" if i.offline else "", i.source)
    out_console.print(table)


from transferlab.cli_ship import register as _register_ship  # noqa: E402

_register_ship(app)
