"""`qtm fit` shows its progress off a terminal too: one line on stderr when a stage starts and when it ends."""

import io

from rich.console import Console

from fitting.fit_command import _progress


def test_a_line_per_stage_off_a_terminal(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    with _progress(console) as progress:
        for stage, total in (("optimizing", 3), ("profiling", 2)):
            advance = progress(stage, total)
            for _ in range(total):
                advance()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "qtm fit: optimizing", "qtm fit: optimizing done", "qtm fit: profiling", "qtm fit: profiling done"]
    assert lines[0] == "qtm fit: optimizing (3)"


def test_no_lines_on_a_terminal(capsys):
    console = Console(file=io.StringIO(), force_terminal=True)
    with _progress(console) as progress:
        advance = progress("optimizing", 1)
        advance()
    assert capsys.readouterr().err == ""
