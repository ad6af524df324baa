"""``runs``, ``verify``, ``doctor`` and ``cache``: find runs, check them, check the machine."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from transferlab.errors import TransferlabError
from transferlab.progress import out_console

_COLUMNS = ("date", "strategy", "backbone", "data", "val_acc", "test_acc", "time_s", "run")
_COLOURS = {"green": "green", "yellow": "yellow", "red": "red"}

cache_app = typer.Typer(no_args_is_help=True, help="The feature cache: info | prune | compact.")


def register(app: typer.Typer) -> None:
    """Add ``runs``, ``verify``, ``doctor`` and ``cache`` to the transferlab CLI app."""
    app.command("runs")(runs)
    app.command("verify")(verify)
    app.command("doctor")(doctor)
    app.add_typer(cache_app, name="cache")


def runs(
    root: Path = typer.Argument(Path("runs"), help="Folder holding run folders (any depth)."),
    sort: str = typer.Option("date", help="Column: " + " | ".join(_COLUMNS[:-1])),
    descending: bool = typer.Option(True, help="--no-descending: smallest first."),
    format: str = typer.Option("table", help="table | csv | json"),
) -> None:
    """A table of the runs under ROOT: date, strategy, backbone, data, val/test accuracy, time."""
    from transferlab.run_listing import run_rows

    if format not in ("table", "csv", "json"):
        raise TransferlabError(f"--format {format!r}: choose table, csv or json")
    if sort not in _COLUMNS:
        raise TransferlabError(f"--sort {sort!r}: choose one of {', '.join(_COLUMNS)}")
    if not root.is_dir():
        raise TransferlabError(f"{root}: no such folder; pass the folder your --out runs are in")
    rows = run_rows(root)
    present = [r for r in rows if r.get(sort) is not None]
    rows = sorted(present, key=lambda r: r[sort], reverse=descending) + [
        r for r in rows if r.get(sort) is None
    ]
    if format == "json":
        out_console.print_json(json.dumps(rows))
    elif format == "csv":
        buf = io.StringIO()
        columns = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]  # incomplete: fewer
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        print(buf.getvalue(), end="")
    else:
        _runs_table(rows, root)


def _acc(row: dict[str, Any], split: str) -> str:
    acc = row.get(f"{split}_acc")
    if acc is None:
        return "–"
    lo, hi = row.get(f"{split}_lo"), row.get(f"{split}_hi")
    return f"{acc:.1%} [{lo:.1%}, {hi:.1%}]" if lo is not None else f"{acc:.1%}"


def _runs_table(rows: list[dict[str, Any]], root: Path) -> None:
    table = Table(title=f"{len(rows)} run(s) under {root}")
    for col in ("run", "date", "strategy", "backbone", "data", "val acc [95% CI]",
                "test acc [95% CI]", "time"):  # fmt: skip
        table.add_column(col, justify="right" if col == "time" else "left")
    for r in rows:
        time_s = r.get("time_s")
        table.add_row(
            str(Path(r["run"]).relative_to(root)) if r["run"] != str(root) else ".",
            r["date"], r.get("strategy") or r["status"], r.get("backbone") or "–",
            Path(r["data"]).name if r["data"] else "–", _acc(r, "val"), _acc(r, "test"),
            f"{time_s:.0f} s" if time_s is not None else "–",
        )  # fmt: skip
    out_console.print(table)
    for r in rows:
        if r["status"] == "incomplete":
            line = f"{r['run']}: interrupted; resume with: {r['resume']}"
            out_console.print(line, soft_wrap=True, highlight=False)


def verify(
    run: Path = typer.Argument(..., help="A run folder written by `fit`."),
    data: Path | None = typer.Argument(None, help="The dataset (default: where it was at fit)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Check RUN's files against their recorded digests, and DATA against the run's inputs.

    Exit 0: unchanged; 1: something differs (each file named)."""
    from transferlab.provenance import check_run_files, verify_data
    from transferlab.runs import is_run_dir

    if not is_run_dir(run):
        raise TransferlabError(f"{run}: not a run folder (no model.json); pass a `fit --out`")
    files = check_run_files(run)
    data_check = verify_data(run, data)
    ok = files.ok and data_check.ok
    if as_json:
        print(json.dumps({"ok": ok, "run": files.__dict__, "data": data_check.__dict__}, indent=2))
        raise typer.Exit(0 if ok else 1)
    if not files.sealed:
        out_console.print(f"run {run}: no files.json (written before digests were recorded)")
    for label, names in (("changed", files.changed), ("missing", files.missing)):
        for name in names:
            out_console.print(f"[red]run file {label}:[/red] {run / name}")
    if files.half_written:
        out_console.print(f"[red]run {run}: half-written (files.json missing)[/red]")
    for label, names in (("added", data_check.added), ("removed", data_check.removed),
                         ("changed", data_check.changed),
                         ("relabelled", data_check.relabelled)):  # fmt: skip
        for name in names:
            out_console.print(f"[red]data {label}:[/red] {name}")
    if data_check.resplit:
        out_console.print(
            f"note: {data_check.resplit} unchanged file(s) would fall in another split now: "
            "the carved val/test splits depend on the whole pool"
        )
    if ok:
        out_console.print(f"[green]unchanged:[/green] {run} and {data_check.root}")
    raise typer.Exit(0 if ok else 1)


def doctor(
    out: Path = typer.Option(Path("runs"), help="The output folder runs will be written to."),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default: the user's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Versions, cores and threads, GPUs, inference engines, cache, weights, Chromium, write
    permissions: green / yellow / red, with the fix for each red. Exit 1 on any red."""
    from transferlab.doctor import has_red, run_checks

    checks = run_checks(out, str(cache_dir) if cache_dir else None)
    if as_json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        for c in checks:
            colour = _COLOURS[c.status]
            line = f"[{colour}]{c.status:>6}[/{colour}]  {c.name}: {c.detail}"
            out_console.print(line + (f"\n        fix: {c.fix}" if c.fix else ""), highlight=False)
    raise typer.Exit(1 if has_red(checks) else 0)


@cache_app.command("info")
def cache_info_cmd(
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default: the user's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Where the cache is, its size, and its size per backbone identity."""
    from transferlab.cache_admin import cache_info, human_bytes

    info = cache_info(cache_dir)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    out_console.print(
        f"{info.root}: {human_bytes(info.bytes)} in {info.files} files ({info.entries} features)"
    )
    for name, ns in sorted(info.namespaces.items(), key=lambda kv: -kv[1]["bytes"]):
        out_console.print(f"  features/{name}: {human_bytes(ns['bytes'])}, {ns['files']} files")
    for name, part in {"exports": info.exports, **info.others}.items():
        out_console.print(f"  {name}: {human_bytes(part['bytes'])}, {part['files']} files")
    if info.oldest_s is not None:
        out_console.print(f"  least recently used entry: {info.oldest_s / 86400:.1f} days ago")


@cache_app.command("prune")
def cache_prune_cmd(
    older_than: str | None = typer.Option(None, help="Remove entries unused for this, e.g. 30d."),
    max_size: str | None = typer.Option(None, help="Then trim to this size, e.g. 5GB."),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default: the user's)."),
    dry_run: bool = typer.Option(False, help="Only say what would be removed."),
) -> None:
    """Remove least recently used cache entries (they are recomputed when needed)."""
    from transferlab.cache_admin import human_bytes, parse_age, parse_size, prune_cache

    done = prune_cache(
        cache_dir,
        older_than_s=parse_age(older_than) if older_than else None,
        max_bytes=parse_size(max_size) if max_size else None,
        dry_run=dry_run,
    )
    verb = "would remove" if dry_run else "removed"
    out_console.print(
        f"{verb} {done['files']} files ({human_bytes(done['bytes'])}); "
        f"{human_bytes(done['kept_bytes'])} kept"
    )


@cache_app.command("compact")
def cache_compact_cmd(
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default: the user's)."),
) -> None:
    """Merge finished feature packs (and old one-file entries) into one pack per backbone."""
    from transferlab.cache_admin import compact_cache

    d = compact_cache(cache_dir)
    out_console.print(
        f"merged {d['packs']} packs: {d['records']} features kept, {d['dropped']} dropped "
        f"(repeats or damaged), {d['migrated']} old one-file entries moved in"
    )
