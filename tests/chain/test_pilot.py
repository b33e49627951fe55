"""chain.pilot's schedule options: `NAME:KEY=VALUE,...` read and checked like a config's condition, and the
config's own non-constant conditions (the pilot itself runs in tests/commands/test_recommend.py)."""

from __future__ import annotations

import pytest

from chain.errors import ConfigError
from chain.guidance import Exponential, Interval
from chain.pilot import check_pilot, config_schedules, parse_schedule
from tests.chain.fixtures import tiny_config


def test_parse_schedule_reads_a_conditions_table():
    q = parse_schedule("exponential:scale=7.5,alpha=2,step_origin=1,condition_drop=0.2")
    assert q.guidance == Exponential(scale_value=7.5, alpha=2.0, step_origin=1) and q.condition_drop == 0.2
    assert q.name == "exponential:scale=7.5,alpha=2,step_origin=1,condition_drop=0.2"
    assert q.parameters() == {"schedule": "exponential", "scale": 7.5, "alpha": 2.0, "step_origin": 1,
                              "condition_drop": 0.2}
    # defaults as in a config file; the alias and a label
    q = parse_schedule("redifine:name=rd")
    assert q.name == "rd" and q.guidance == Exponential() and q.condition_drop == 0.0
    assert parse_schedule("interval:sigma_low=1,sigma_high=3").guidance == Interval(7.5, 1.0, 3.0)


@pytest.mark.parametrize("text, message", [
    ("exponential:alpha=-1", "field 'schedule.alpha' = -1.0: must be a number >= 0"),
    ("expo:scale=2", "known schedules: constant, exponential"),
    ("constant:scale=2", "a constant scale is one of scales"),
    ("exponential:scale", "'scale' is not KEY=VALUE"),
    ("exponential:scale=2,scale=3", "'scale' is given twice"),
    ("exponential:step_origin=0.5", "'schedule.step_origin' must be an integer"),
    ("interval:sigma_low=3,sigma_high=1", "must have sigma_low < sigma_high"),
    ("exponential:condition_drop=1.5", "'schedule.condition_drop' = 1.5"),
])
def test_parse_schedule_refuses_bad_text_naming_the_option(text, message):
    with pytest.raises(ConfigError) as err:
        parse_schedule(text)
    shown = err.value.message({"schedules": "--schedule", "scales": "--scales"})
    assert shown.startswith(f"--schedule {text!r}: "), shown
    assert message.replace("one of scales", "one of --scales") in shown, shown


def test_config_schedules_are_the_non_constant_conditions(tmp_path):
    cfg = tiny_config(tmp_path)  # cfg7.5 (constant) and redifine (exponential, condition drop 0.2)
    (q,) = config_schedules(cfg)
    assert (q.name, q.guidance, q.condition_drop) == ("redifine", Exponential(7.5, 2.0, 0), 0.2)
    constant_only = tiny_config(tmp_path, conditions=[{"name": "cfg2", "schedule": "constant", "scale": 2.0}])
    assert config_schedules(constant_only) == ()
    with pytest.raises(ConfigError, match="used twice"):
        check_pilot(cfg, (1.0, 2.0, 3.0), 8, 0, (q, q))
