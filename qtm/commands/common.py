"""What every command shares: option types, the one mapping of library errors to messages and exit codes,
output checks, JSON, consoles and progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qtmio.errors import LibraryError

EXIT_USAGE = 2
"""Exit code of every refused input, as typer's own usage errors."""

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
NetcdfOut = Annotated[Path | None, typer.Option(
    "--out", help="Also write the result as a netCDF dataset to this file (.nc).")]
PlotOut = Annotated[Path | None, typer.Option(
    "--plot", help="Also draw the result to this image file (.png, .pdf or .svg).")]


def fail(message: str, *, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear error line on stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
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
    """Print one JSON object on stdout (numpy scalars and arrays converted)."""
    sys.stdout.write(json.dumps(obj, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


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


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int], ProgressBar] | None]:
    """Rich progress bars on stderr for the libraries' `progress` callbacks: yields
    `start(description, total) -> ProgressBar`, or None when disabled or when stderr is not a terminal
    (the libraries then report nothing)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=err, transient=True) as bars:
        yield lambda description, total: ProgressBar(bars, description, total)
