"""chain's errors: `ChainError` is the base of every error the experiment raises on purpose (qtmio.errors
explains the convention: messages name the caller's parameters and configuration fields, a shell may show
its own names for them)."""

from __future__ import annotations

import os
from pathlib import Path

from qtmio.errors import LibraryError


class ChainError(LibraryError):
    """Base class of chain's errors."""


class ConfigError(ChainError, ValueError):
    """An invalid configuration; the message names the file and the field."""


class DatasetError(ChainError, ValueError):
    """The captioned dataset D_0 cannot be used; the message lists every problem file."""


class ImageReadError(ChainError, ValueError):
    """An image file could not be decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ModelLoadError(ChainError, ValueError):
    """A base model could not be found or read; the message names the folder or id and the fix."""


class RunError(ChainError, ValueError):
    """A run cannot start or continue; the message names the file and the fix."""


class ExportError(ChainError, ValueError):
    """A model of a run cannot be exported (chain.export); the message names the run, the cell or the folder
    and the fix."""
