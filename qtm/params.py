"""Parameters of the quantitative-trait model (docs/model.md section 1).

`TraitParams` is a frozen dataclass registered as a JAX pytree: the seven float fields are leaves (so
`jax.vmap`, `jax.grad` and `jax.jit` see them), `mutation_mode` is static auxiliary data (a change of mode
recompiles). Defaults are the paper's (Appendix D.2.2): mu_0 = 0.027, sigma_G,0 = 0.056, sigma_E = 0.25,
with the (r1, r2) = (0.025, 0.675) window and hard truncation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from qtm.errors import ParameterError

MUTATION_MODES = ("paper", "additive")
"""`paper`: Eq. 16, mutation only lowers the heritability h2 = V_G / (V_P + V_M).
`additive`: mutation adds V_M to the next genetic variance, V_G,t+1 = V_P,t v_sel + V_M (docs/model.md section 3)."""

PARAM_NAMES = ("r1", "r2", "tail_rate", "sigma_mut", "mu0", "sigma_g0", "sigma_env")
"""The float fields of `TraitParams`, in pytree-leaf order."""


@dataclasses.dataclass(frozen=True)
class TraitParams:
    """One setting of the trait model (docs/model.md sections 1-3).

    Attributes:
        r1: fraction truncated from the left (low) tail of the phenotype, 0 <= r1 < 1.
        r2: fraction truncated from the right (high) tail, 0 <= r2 < 1, r1 + r2 < 1.
        tail_rate: lambda, softness of the selection tails per phenotypic standard deviation
            (Appendix D.2.3); `math.inf` is hard truncation (Eq. 7-8).
        sigma_mut: sigma_M, V_M = sigma_mut**2 (ReDiFine's mutation, Eq. 16); 0 = none.
        mu0: phenotype mean at iteration 0.
        sigma_g0: genetic standard deviation at iteration 0, V_G,0 = sigma_g0**2.
        sigma_env: environmental standard deviation, V_E = sigma_env**2, constant.
        mutation_mode: "paper" or "additive" (see `MUTATION_MODES`); static under jit.

    The float fields may hold JAX arrays (under `vmap`/`grad`); `validate` checks Python floats only.
    """

    r1: Any = 0.025
    r2: Any = 0.675
    tail_rate: Any = math.inf
    sigma_mut: Any = 0.0
    mu0: Any = 0.027
    sigma_g0: Any = 0.056
    sigma_env: Any = 0.25
    mutation_mode: str = "paper"

    def validate(self) -> None:
        """Raise ParameterError (a ValueError) naming the first invalid field and the fix (for concrete Python
        floats). Messages name the fields in braces (qtmio.errors), so a shell can show its flags instead."""
        if self.mutation_mode not in MUTATION_MODES:
            raise ParameterError(f"{{mutation_mode}} must be one of {', '.join(MUTATION_MODES)}; got "
                                 f"{self.mutation_mode!r}", parameters=("mutation_mode",))
        values = {name: getattr(self, name) for name in PARAM_NAMES}
        for name, value in values.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise ParameterError(f"{{{name}}} must be a number; got {value!r}", parameters=(name,)) from None
            if math.isnan(values[name]):
                raise ParameterError(f"{{{name}}} must be a number; got NaN", parameters=(name,))
        for name in ("r1", "r2"):
            if not 0.0 <= values[name] < 1.0:
                raise ParameterError(f"{{{name}}} must lie in [0, 1); got {values[name]}", parameters=(name,))
        if values["r1"] + values["r2"] >= 1.0:
            raise ParameterError(
                f"{{r1}} + {{r2}} must be < 1 (some individuals must be selected); got {values['r1']} + "
                f"{values['r2']} = {values['r1'] + values['r2']}", parameters=("r1", "r2"))
        if not values["tail_rate"] > 0.0:
            raise ParameterError(f"{{tail_rate}} must be > 0 (inf = hard truncation); got {values['tail_rate']}",
                                 parameters=("tail_rate",))
        for name in ("sigma_mut", "sigma_g0", "sigma_env"):
            if not (values[name] >= 0.0 and math.isfinite(values[name])):
                raise ParameterError(f"{{{name}}} must be a finite standard deviation >= 0; got {values[name]}",
                                     parameters=(name,))
        if not math.isfinite(values["mu0"]):
            raise ParameterError(f"{{mu0}} must be finite; got {values['mu0']}", parameters=("mu0",))
        if values["sigma_g0"] == 0.0 and values["sigma_env"] == 0.0:
            raise ParameterError("{sigma_g0} and {sigma_env} are both 0: the phenotypic variance must be > 0",
                                 parameters=("sigma_g0", "sigma_env"))

    def to_dict(self) -> dict[str, float | str]:
        """Plain-Python dict of all fields (for dataset attrs and JSON)."""
        out: dict[str, float | str] = {name: float(getattr(self, name)) for name in PARAM_NAMES}
        out["mutation_mode"] = self.mutation_mode
        return out


jax.tree_util.register_dataclass(TraitParams, data_fields=list(PARAM_NAMES), meta_fields=["mutation_mode"])


def require_x64() -> None:
    """Raise RuntimeError unless JAX runs in float64 (float32 loses the far tails).

    Library code never switches it on; the `qtm` CLI and tests/conftest.py do, and a script calls
    `jax.config.update("jax_enable_x64", True)` before using qtm.
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "qtm needs float64 JAX: call jax.config.update('jax_enable_x64', True) at program start "
            "(or set JAX_ENABLE_X64=1)")
