"""`make bench`: run every benchmarks/bench_*.py module's `main()` in turn (or those named on the command line).

    python -m benchmarks                      # all of them
    python -m benchmarks bench_fit spectra    # some (the bench_ prefix may be left out)
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def available() -> list[str]:
    """The benchmark modules next to this file, by name."""
    return sorted(p.stem for p in Path(__file__).resolve().parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    known = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(known)})")
    args = parser.parse_args(argv)
    names = [n if n.startswith("bench_") else f"bench_{n}" for n in args.names] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for name in names:
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
