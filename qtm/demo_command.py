"""`qtm demo` (being built)."""

from qtm.cli_common import fail


def demo() -> None:
    """Not yet available."""
    fail("qtm demo is not built yet")
