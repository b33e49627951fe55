"""qtmio.errors: one error convention for every library, parameters named in braces."""

from __future__ import annotations

import pytest

from chain.errors import ChainError, ConfigError, DatasetError, ImageReadError, ModelLoadError, RunError
from fitting.errors import FitError, FittingError, ModelError, ObservationError
from qtm.errors import ParameterError, QtmError
from qtmio.errors import ContractError, LibraryError


def test_parameters_are_named_by_the_caller():
    err = LibraryError("{selection} must be one of hard, soft; got 'x' {kept}", parameters=("selection",))
    assert str(err) == "selection must be one of hard, soft; got 'x' {kept}"
    assert err.message({"selection": "--model"}) == "--model must be one of hard, soft; got 'x' {kept}"
    assert err.message({"other": "--other"}) == str(err)
    two = LibraryError("{r1} + {r2} must be < 1", parameters=("r1", "r2"))
    assert two.message({"r1": "--r1", "r2": "--r2"}) == "--r1 + --r2 must be < 1"
    plain = LibraryError("a {brace} that is not a parameter")
    assert str(plain) == plain.message({"brace": "--x"}) == "a {brace} that is not a parameter"


@pytest.mark.parametrize(("error", "base", "builtin"), [
    (ParameterError, QtmError, ValueError), (ConfigError, ChainError, ValueError),
    (DatasetError, ChainError, ValueError), (ModelLoadError, ChainError, ValueError),
    (RunError, ChainError, ValueError), (ImageReadError, ChainError, ValueError),
    (ObservationError, FittingError, ValueError), (ModelError, FittingError, ValueError),
    (FitError, FittingError, RuntimeError), (ContractError, LibraryError, ValueError),
])
def test_every_library_error_has_its_library_base(error, base, builtin):
    assert issubclass(error, base) and issubclass(base, LibraryError) and issubclass(error, builtin)


def test_library_errors_name_parameters_not_flags():
    from fitting.model import ModelSpec
    from qtm.params import TraitParams

    with pytest.raises(ModelError) as info:
        ModelSpec(selection="soft", fixed=(("tail_rate", float("inf")),)).validate()
    assert "--" not in str(info.value) and info.value.parameters == ("fixed", "selection")
    with pytest.raises(ParameterError) as info:
        TraitParams(r1=0.7, r2=0.5).validate()
    assert str(info.value).startswith("r1 + r2 must be < 1") and info.value.parameters == ("r1", "r2")
