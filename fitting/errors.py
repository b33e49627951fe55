"""fitting's errors: `FittingError` is the base of every error the inference raises on purpose
(qtmio.errors explains the convention: messages name the fields of ModelSpec and FitConfig, a shell may
show its own names for them)."""

from __future__ import annotations

from qtmio.errors import LibraryError


class FittingError(LibraryError):
    """Base class of fitting's errors."""


class ObservationError(FittingError, ValueError):
    """A results dataset that cannot be fitted; the message names the file, the variable and the fix."""


class ModelError(FittingError, ValueError):
    """An inconsistent model or fit specification (ModelSpec, FitConfig); the message names the field and
    the fix."""


class FitError(FittingError, RuntimeError):
    """The optimization failed from every start; the message says what was tried."""


class AssayError(FittingError, ValueError):
    """A dataset or setting the selection assay (fitting.assay) cannot use; the message names the file, the
    variable or the field, and the fix."""


class ConstantDataError(ObservationError):
    """Data with zero variance in every cell (all values of each iteration identical): the likelihood has no
    finite optimum."""


class UnderdeterminedError(ModelError):
    """More free parameters than the data give statistics: the fit is not determined."""
