"""Declarative value constraints for configuration dataclasses (no torch, no model imports).

A field declares what it allows next to its default::

    adam_beta1: float = spec(0.9, ge=0.0, lt=1.0)

and `field_problems(obj, prefix)` walks every field of a (nested) frozen dataclass and returns one line per
bad value, naming the field (section.key), the value and what is allowed. Floats are always required to be
finite (nan and inf are refused). Cross-field consistency lives in small rule tables beside the
dataclasses (chain.config.CROSS_FIELD_RULES), checked by the same loop in chain.config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Check:
    """What one field allows. Bounds apply to numbers and to every item of a tuple of numbers."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None  # the value (or every item of a tuple) must be one of these
    nonempty: bool = False  # strings and tuples
    pattern: str | None = None  # a regular expression the whole string must match
    pattern_help: str = ""  # what the pattern means, in words
    note: str = ""  # appended to the message: what special values mean

    def describe(self) -> str:
        """What is allowed, in words."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(_show(c) for c in self.choices))
        low = f"[{_num(self.ge)}" if self.ge is not None else (f"({_num(self.gt)}" if self.gt is not None else None)
        high = f"{_num(self.le)}]" if self.le is not None else (f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            parts.append(f"a finite number in {low}, {high}")
        elif low:
            parts.append(f"a number {'>=' if self.ge is not None else '>'} {_num(self.ge if self.ge is not None else self.gt)}")
        elif high:
            parts.append(f"a number {'<=' if self.le is not None else '<'} {_num(self.le if self.le is not None else self.lt)}")
        if self.nonempty:
            parts.append("not empty")
        if self.pattern is not None:
            parts.append(self.pattern_help or f"matching {self.pattern}")
        text = "; ".join(parts) or "a finite number"
        return f"{text} ({self.note})" if self.note else text


def spec(default: Any = dataclasses.MISSING, *, key: str | None = None, **check: Any) -> Any:
    """A dataclass field with a default and a Check (see the module docstring); `key` is the field's name in
    a config file when it differs from the attribute name."""
    metadata = {"check": Check(**check)}
    if key is not None:
        metadata["key"] = key
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def toml_value(value: Any) -> str:
    """A value as a TOML config file spells it (the config writer's and the error messages' one spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _show(value: Any) -> str:
    try:
        return toml_value(value)
    except TypeError:
        return repr(value)


def _scalar_ok(value: Any, check: Check) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if check.choices is not None and value not in check.choices:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if check.ge is not None and not value >= check.ge:
            return False
        if check.gt is not None and not value > check.gt:
            return False
        if check.le is not None and not value <= check.le:
            return False
        if check.lt is not None and not value < check.lt:
            return False
    if isinstance(value, str):
        if check.nonempty and not value:
            return False
        if check.pattern is not None and not re.fullmatch(check.pattern, value):
            return False
    return True


def value_ok(value: Any, check: Check) -> bool:
    """Whether `value` satisfies `check` (tuples: not empty when required, and every item)."""
    if isinstance(value, tuple):
        if check.nonempty and not value:
            return False
        return all(_scalar_ok(v, check) for v in value)
    return _scalar_ok(value, check)


def field_problems(obj: Any, prefix: str) -> list[str]:
    """One line per field of dataclass `obj` (recursively) whose value breaks its Check, or a float field
    holding nan/inf: "field 'prefix.key' = value: must be ...". Config-file names are used for renamed
    fields (a field's metadata "key")."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f.metadata.get("key", f.name)
        name = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(value):
            problems.extend(field_problems(value, prefix if f.metadata.get("flatten") else name))
            continue
        check = f.metadata.get("check")
        if check is None:
            check = Check()
        if not value_ok(value, check):
            problems.append(f"field '{name}' = {_show(value)}: must be {check.describe()}")
    return problems


def show_value(value: Any) -> str:
    """A value as a config file would spell it."""
    return _show(value)
