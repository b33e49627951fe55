"""`qtm run` (not yet built)."""

from qtm.cli_common import fail


def run() -> None:
    """Not yet available."""
    fail("qtm run is not built yet")
