"""Tests of the commands (qtm.commands) through the CLI."""

import subprocess
import sys


def assert_runs_without_torch(args: list[str]) -> None:
    """Run `qtm ARGS` through the CLI in a fresh interpreter: it succeeds, prints JSON, and torch was never
    imported (the torch-free commands start without it)."""
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from qtm.cli import app\n"
        f"r = CliRunner().invoke(app, {list(args)!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "json.loads(r.stdout)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
