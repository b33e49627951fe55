"""What every command shares: option types, the one mapping of library errors to messages and exit codes,
output checks, JSON, consoles and progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qtmio.errors import LibraryError
from qtmio.strict_json import dumps_strict

EXIT_USAGE = 2
"""Exit code of every refused input, as typer's own usage errors."""

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
NetcdfOut = Annotated[Path | None, typer.Option(
    "--out", help="Also write the result as a netCDF dataset to this file (.nc).")]
PlotOut = Annotated[Path | None, typer.Option(
    "--plot", help="Also draw the result to this image file (.png, .pdf or .svg).")]
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
"""The figure formats of PlotOut (checked with check_output before any work)."""


def fail(message: str, *, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear error line on stderr (one per line of `message`, e.g. one per bad config value) and
    exit non-zero."""
    for line in str(message).splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported(flags: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run library calls so that an error a library raises on purpose (qtmio.errors.LibraryError) becomes one
    line on stderr and exit code 2; `flags` maps the library's parameter names to this command's flags
    (e.g. {"num_starts": "--starts"}), so the message names what the user typed."""
    try:
        yield
    except LibraryError as err:
        fail(err.message(flags))


@contextlib.contextmanager
def writing(flag: str, path: Path) -> Iterator[None]:
    """Write one requested output: a file-system error, or a format the writer does not know (ValueError,
    e.g. an unknown image suffix), becomes one line naming the flag and the file."""
    try:
        yield
    except OSError as err:
        fail(f"{flag} {path}: cannot write ({err.strerror or err})")
    except ValueError as err:
        fail(f"{flag} {path}: {err}")


def note(message: str) -> None:
    """Print one note for the user on stderr (what a library reports through its `notify` callback)."""
    typer.echo(f"note: {message}", err=True)


def check_output(flag: str, path: Path | None, *, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse an output path that is a folder, or (with `suffixes`) has another suffix, before any work."""
    if path is None:
        return
    if path.is_dir():
        fail(f"{flag} {path} is a directory; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        ending = suffixes[0] if len(suffixes) == 1 else f"one of {', '.join(suffixes)}"
        fail(f"{flag} {path}: use a file name ending in {ending}")


def print_json(obj: Any) -> None:
    """Print one strict JSON object on stdout (qtmio.strict_json: NaN -> null, infinities -> "inf"/"-inf")."""
    sys.stdout.write(dumps_strict(obj) + "\n")


def console():
    """A rich console on stdout (120 columns when not a terminal, so piped tables do not wrap)."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=120)


class ProgressBar:
    """One rich bar: `bar()` advances it by one, `bar(n)` by n; `completed=` and `total=` set them, `info=`
    the text beside it. A bar disappears once it is complete."""

    def __init__(self, bars, description: str, total: int):
        self._bars = bars
        self._task = bars.add_task(description, total=total, info="")

    def __call__(self, advance: float = 1, *, completed: float | None = None, total: float | None = None,
                 info: str = "") -> None:
        if self._task is None:
            return
        position = {"advance": advance} if completed is None else {"completed": completed}
        self._bars.update(self._task, total=total, info=info, **position)
        if next(task for task in self._bars.tasks if task.id == self._task).finished:
            self._bars.remove_task(self._task)
            self._task = None


class StageLines:
    """Progress off a terminal (a log file, a pipe, CI): one line on stderr when a stage starts and one when
    it ends, `<prefix>: <stage> (<total>)` and `<prefix>: <stage> done (<seconds> s)`; called like a
    ProgressBar."""

    def __init__(self, prefix: str, description: str, total: int):
        import time

        self._prefix, self._description, self._total = prefix, description, total
        self._done, self._start = 0.0, time.perf_counter()
        print(f"{prefix}: {description} ({total})", file=sys.stderr, flush=True)

    def __call__(self, advance: float = 1, *, completed: float | None = None, total: float | None = None,
                 info: str = "") -> None:
        import time

        if self._done >= self._total:
            return
        self._total = self._total if total is None else total
        self._done = self._done + advance if completed is None else completed
        if self._done >= self._total:
            print(f"{self._prefix}: {self._description} done ({time.perf_counter() - self._start:.1f} s)",
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bars(enabled: bool = True, *, lines: str | None = None,
                  stderr=None) -> Iterator[Callable[[str, int], ProgressBar | StageLines] | None]:
    """Rich progress bars on stderr for the libraries' `progress` callbacks: yields
    `start(description, total) -> ProgressBar`, or None when disabled. Off a terminal it yields None (the
    libraries then report nothing), or with `lines` (a prefix such as "qtm fit") a StageLines per stage.
    `stderr`: the rich console to draw on (default: a new one on stderr)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = stderr if stderr is not None else Console(stderr=True)
    if not enabled:
        yield None
        return
    if not err.is_terminal:
        yield (lambda description, total: StageLines(lines, description, total)) if lines else None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=err, transient=True) as bars:
        yield lambda description, total: ProgressBar(bars, description, total)
