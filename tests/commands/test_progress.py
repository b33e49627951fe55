"""Progress of the commands off a terminal: with a prefix (as `qtm fit` asks), one line on stderr when a stage
starts and one when it ends; on a terminal rich bars and no plain lines."""

import io

from rich.console import Console

from qtm.commands.common import progress_bars


def test_a_line_per_stage_off_a_terminal(capsys):
    with progress_bars(lines="qtm fit", stderr=Console(file=io.StringIO(), force_terminal=False)) as start:
        for stage, total in (("optimizing", 3), ("profiling", 2)):
            advance = start(stage, total)
            for _ in range(total):
                advance()
            advance()  # past the end: no second "done"
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "qtm fit: optimizing", "qtm fit: optimizing done", "qtm fit: profiling", "qtm fit: profiling done"]
    assert lines[0] == "qtm fit: optimizing (3)"


def test_nothing_off_a_terminal_without_a_prefix(capsys):
    with progress_bars(stderr=Console(file=io.StringIO(), force_terminal=False)) as start:
        assert start is None
    assert capsys.readouterr().err == ""


def test_no_lines_on_a_terminal(capsys):
    with progress_bars(lines="qtm fit", stderr=Console(file=io.StringIO(), force_terminal=True)) as start:
        advance = start("optimizing", 1)
        advance()
    assert capsys.readouterr().err == ""
