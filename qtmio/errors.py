"""The errors of the project's libraries: one convention, so that one place in the shell
(`qtm.commands.common.reported`) turns any of them into a message and an exit code.

Every library has one base class deriving from `LibraryError`: `qtm.errors.QtmError`,
`chain.errors.ChainError`, `fitting.errors.FittingError`, and `ContractError` here. A message says what is
wrong in the library's own terms. Where it names a parameter that the caller passed (a function argument or
a configuration field), it writes the name in braces and lists it in `parameters`:

    raise ModelError("{selection} must be one of hard, soft; got 'medium'", parameters=("selection",))

str(err) shows the names as they are ("selection must be one of hard, soft; got 'medium'"); a caller that
calls them something else passes its own names, err.message({"selection": "--model"}) -> "--model must be
one of hard, soft; got 'medium'". Nothing else in the text is touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class LibraryError(Exception):
    """An error a library raises on purpose: bad input or a state it cannot continue from, with the fix."""

    def __init__(self, message: str, *, parameters: Iterable[str] = ()):
        self.template = message
        self.parameters = tuple(parameters)
        super().__init__(self.message())

    def message(self, names: Mapping[str, str] | None = None) -> str:
        """The message with every `{parameter}` replaced by `names[parameter]` (default: the name itself)."""
        names = names or {}
        text = self.template
        for name in self.parameters:
            text = text.replace("{" + name + "}", names.get(name, name))
        return text


class ContractError(LibraryError, ValueError):
    """A run folder or dataset that breaks the results contract; the message names the file, the variable
    and the fix."""
