"""`python -m benchmarks`: its command line (the benchmarks themselves are `make bench`'s job)."""

import pytest

from benchmarks.__main__ import available, main


def test_lists_the_bench_modules():
    names = available()
    assert "bench_fit" in names and all(n.startswith("bench_") for n in names)


def test_unknown_name_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nonesuch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bench_nonesuch" in err and "bench_fit" in err


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "bench_fit" in capsys.readouterr().out
