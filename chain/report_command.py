"""`qtm report` (not yet built)."""

from qtm.cli_common import fail


def report() -> None:
    """Not yet available."""
    fail("qtm report is not built yet")
