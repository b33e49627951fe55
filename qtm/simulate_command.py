"""`qtm simulate` (not yet built)."""

from qtm.cli_common import fail


def simulate() -> None:
    """Not yet available."""
    fail("qtm simulate is not built yet")
