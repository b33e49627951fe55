"""`qtm fit` (not yet built)."""

from qtm.cli_common import fail


def fit() -> None:
    """Not yet available."""
    fail("qtm fit is not built yet")
