"""qtm's errors: `QtmError` is the base of every error the theory raises on purpose (qtmio.errors explains the
convention: messages name the caller's parameters, a shell may show its own names for them)."""

from __future__ import annotations

from qtmio.errors import LibraryError


class QtmError(LibraryError):
    """Base class of qtm's errors."""


class ParameterError(QtmError, ValueError):
    """An invalid parameter setting (`TraitParams.validate`); the message names the parameter and the fix."""
