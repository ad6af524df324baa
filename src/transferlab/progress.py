"""Progress bars and console output shared by the API and the CLI (rich, to stderr)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)  # progress, info and warnings
out_console = Console(stderr=False)  # results, which users read or pipe


def say(line: str) -> None:
    """One result line on stdout, never wrapped (paths stay whole when piped) nor highlighted."""
    out_console.print(line, soft_wrap=True, highlight=False)


def quiet() -> bool:
    return os.environ.get("TRANSFERLAB_QUIET", "") not in ("", "0")


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a bar on a terminal, nothing when quiet or piped."""
    if quiet() or total <= 0 or not console.is_terminal:
        yield lambda n: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def info(message: str) -> None:
    if not quiet():
        console.print(message, highlight=False)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
