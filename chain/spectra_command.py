"""`qtm spectra` (not yet built)."""

from qtm.cli_common import fail


def spectra() -> None:
    """Not yet available."""
    fail("qtm spectra is not built yet")
