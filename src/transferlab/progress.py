"""Progress bars and console output shared by the API and the CLI (rich, to stderr)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from html import escape

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _console(stderr: bool) -> Console:
    """A terminal or notebook keeps its width; a pipe or log file gets lines as long as they
    are (rich's 80 columns would cut table cells: paths truncated to ``…/do…``)."""
    c = Console(stderr=stderr)
    return c if c.is_terminal or c.is_jupyter else Console(stderr=stderr, width=_UNBOUNDED)


_UNBOUNDED = 10_000  # columns: wider than any row (rich tables only take the width they need)
console = _console(stderr=True)  # progress, info and warnings
out_console = _console(stderr=False)  # results, which users read or pipe


def say(line: str) -> None:
    """One result line on stdout, never wrapped (paths stay whole when piped) nor highlighted."""
    out_console.print(line, soft_wrap=True, highlight=False)


_VERBOSE: list[bool | None] = [None]  # set by ``verbosity``; None: the environment decides


def quiet() -> bool:
    if _VERBOSE[-1] is not None:
        return not _VERBOSE[-1]
    return os.environ.get("TRANSFERLAB_QUIET", "") not in ("", "0")


@contextmanager
def verbosity(verbose: bool | None) -> Iterator[None]:
    """Within the block, progress and info are on (True), off (False), or as TRANSFERLAB_QUIET
    says (None): the API's ``verbose=``."""
    _VERBOSE.append(verbose if verbose is not None else _VERBOSE[-1])
    try:
        yield
    finally:
        _VERBOSE.pop()


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich's console is no terminal)."""
    return console.is_jupyter


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``. A live bar on a terminal or in a notebook; elsewhere (piped, a
    script with no display) one line per phase when it ends; nothing when quiet."""
    if quiet() or total <= 0:
        yield lambda n: None
    elif console.is_terminal:
        with _terminal_bar(total, description) as advance:
            yield advance
    elif in_notebook():
        with _notebook_bar(total, description) as advance:
            yield advance
    else:
        done = [0]
        t0 = time.perf_counter()
        yield lambda n: done.__setitem__(0, done[0] + n)
        console.print(phase_line(description, done[0], total, time.perf_counter() - t0),
                      markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def phase_line(description: str, done: int, total: int, seconds: float) -> str:
    """The line a finished phase leaves: ``checking images: 120/120 in 1.4 s``."""
    return f"{description}: {done}/{total} in {seconds:.1f} s"


@contextmanager
def _terminal_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
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


@contextmanager
def _notebook_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A bar drawn as HTML and updated in place (IPython display ids: no ipywidgets needed);
    redrawn at most 5 times a second, and left as the phase's one-line summary."""
    from IPython.display import display

    t0 = time.perf_counter()
    state = {"done": 0, "drawn": 0.0}

    def bundle(final: bool = False) -> dict[str, str]:
        done, elapsed = state["done"], time.perf_counter() - t0
        line = phase_line(description, done, total, elapsed)
        if final:
            return {"text/plain": line, "text/html": f"<code>{escape(line)}</code>"}
        bar = f"<progress value='{done}' max='{total}' style='width:40%'></progress>"
        return {
            "text/plain": f"{description}: {done}/{total}",
            "text/html": f"<code>{escape(description)}</code> {bar} "
            f"<code>{done}/{total} {elapsed:.1f} s</code>",
        }

    handle = display(bundle(), raw=True, display_id=True)

    def advance(n: int) -> None:
        state["done"] += n
        now = time.perf_counter()
        if now - state["drawn"] >= 0.2 and handle is not None:
            state["drawn"] = now
            handle.update(bundle(), raw=True)

    yield advance
    if handle is not None:
        handle.update(bundle(final=True), raw=True)


# soft_wrap: a line is never broken at the console's width, so paths stay whole in a log
def info(message: str) -> None:
    if not quiet():
        console.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
