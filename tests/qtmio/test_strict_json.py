"""qtmio.strict_json against the convention of docs/results-contract.md ("JSON output"): NaN -> null,
+inf -> "inf", -inf -> "-inf", checked with a parser that refuses NaN/Infinity tokens."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qtmio.strict_json import dumps_strict, to_strict_json


def _refuse(token):
    raise ValueError(f"non-strict JSON token {token}")


def strict_loads(text: str):
    """A strict parser: Python's json accepts NaN/Infinity unless told otherwise."""
    return json.loads(text, parse_constant=_refuse)


def test_strict_parser_refuses_what_json_dumps_writes_by_default():
    with pytest.raises(ValueError):
        strict_loads(json.dumps({"x": math.nan}))


def test_conversion_convention():
    value = {"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(np.nan), "e": np.array([1.0, np.inf]),
             "f": np.int64(3), "g": [np.float64(0.5), None, True], "h": Path("x/y"), 4: np.bool_(True)}
    assert to_strict_json(value) == {"a": None, "b": "inf", "c": "-inf", "d": None, "e": [1.0, "inf"], "f": 3,
                                     "g": [0.5, None, True], "h": "x/y", "4": True}
    assert strict_loads(dumps_strict(value))["e"] == [1.0, "inf"]
