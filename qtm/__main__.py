"""`python -m qtm` runs the command-line interface."""

from qtm.cli import app

app()
