"""Classifier-free guidance scale schedules.

A schedule is a small frozen dataclass with one method, `scale(step, num_steps, sigma)`, giving the CFG
scale s used at sampling step `step` (0-based, `num_steps` steps in all, current noise level `sigma`):

    noise = uncond + s * (cond - uncond)

Schedules register under a name (`register_schedule`); a config's `[[conditions]]` table names one with
`schedule = "..."` and gives its fields beside it. New schedules need only a dataclass and a registration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import numpy as np

from chain.constraints import spec


@runtime_checkable
class GuidanceSchedule(Protocol):
    """What every schedule offers: its registry name, a nominal scale and the per-step scale."""

    name: str

    @property
    def nominal_scale(self) -> float: ...

    def scale(self, step: int, num_steps: int, sigma: float) -> float: ...


@dataclasses.dataclass(frozen=True)
class Constant:
    """s_t = scale at every step (standard CFG; scale 1.0 means no guidance)."""

    scale_value: float = spec(7.5, key="scale", ge=0.0, note="1 = no guidance")
    name = "constant"

    @property
    def nominal_scale(self) -> float:
        return self.scale_value

    def scale(self, step: int, num_steps: int, sigma: float) -> float:
        return float(self.scale_value)


@dataclasses.dataclass(frozen=True)
class Exponential:
    """ReDiFine's decaying guidance s_t = s0 exp(-alpha t / T), t = step + step_origin, T = num_steps.

    `step_origin` 0 counts the first sampling step as t = 0 (scale s0 there), 1 as t = 1; the ReDiFine
    paper leaves this open, so it is a field.
    """

    scale_value: float = spec(7.5, key="scale", ge=0.0, note="1 = no guidance")
    alpha: float = spec(2.0, ge=0.0, note="0 = constant guidance")
    step_origin: int = spec(0, ge=0)
    name = "exponential"

    @property
    def nominal_scale(self) -> float:
        return self.scale_value

    def scale(self, step: int, num_steps: int, sigma: float) -> float:
        t = step + self.step_origin
        return float(self.scale_value * math.exp(-self.alpha * t / num_steps))


@dataclasses.dataclass(frozen=True)
class Interval:
    """Guidance only in a noise-level interval (Kynkaanniemi et al. 2024): s = scale when
    sigma_low < sigma <= sigma_high, else 1.0 (the conditional prediction alone)."""

    scale_value: float = spec(7.5, key="scale", ge=0.0, note="1 = no guidance")
    sigma_low: float = spec(0.28, ge=0.0)
    sigma_high: float = spec(5.42, gt=0.0)
    name = "interval"

    @property
    def nominal_scale(self) -> float:
        return self.scale_value

    def scale(self, step: int, num_steps: int, sigma: float) -> float:
        return float(self.scale_value) if self.sigma_low < sigma <= self.sigma_high else 1.0


@dataclasses.dataclass(frozen=True)
class Linear:
    """s_t = start + (end - start) t / (T - 1), t = step: linear from `start` at the first step to `end`
    at the last (increasing when end > start, as in Wang et al. 2024)."""

    start: float = spec(7.5, ge=0.0)
    end: float = spec(1.0, ge=0.0)
    name = "linear"

    @property
    def nominal_scale(self) -> float:
        return self.start

    def scale(self, step: int, num_steps: int, sigma: float) -> float:
        if num_steps <= 1:
            return float(self.start)
        return float(self.start + (self.end - self.start) * step / (num_steps - 1))


SCHEDULES: dict[str, type] = {}


def register_schedule(name: str, cls: type) -> None:
    """Make `cls` (a frozen dataclass with `scale(step, num_steps, sigma)`) available as `schedule = name`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"schedule {name!r}: {cls!r} is not a dataclass")
    SCHEDULES[name] = cls


for _cls in (Constant, Exponential, Interval, Linear):
    register_schedule(_cls.name, _cls)
register_schedule("redifine", Exponential)


def schedule_fields(cls: type) -> dict[str, str]:
    """Config-file names of a schedule's fields -> dataclass attribute names (`scale` -> `scale_value`)."""
    return {("scale" if f.name == "scale_value" else f.name): f.name for f in dataclasses.fields(cls)}


def schedule_to_table(schedule) -> dict:
    """The config-file table of a schedule: `schedule = name` plus its fields."""
    table = {"schedule": schedule.name}
    for key, attr in schedule_fields(type(schedule)).items():
        table[key] = getattr(schedule, attr)
    return table


def guidance_scales(schedule, sigmas) -> np.ndarray:
    """The scale at every sampling step for the given per-step noise levels (length T = num_steps)."""
    sigmas = [float(s) for s in sigmas]
    return np.array([schedule.scale(i, len(sigmas), s) for i, s in enumerate(sigmas)], dtype=np.float64)
