"""The fit's objective, transforms and specification against independent references (scipy, qtm)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fitting.model import (
    ModelError,
    ModelSpec,
    build_problem,
    cell_nll,
    embed,
    free_values,
    profile_value_and_grad,
    reduce_vector,
    report_jacobian,
    report_scale,
    to_natural,
    to_unconstrained,
)
from fitting.observations import from_phenotypes
from fitting.optimize import local_minimize, random_tables
from qtm.params import PARAM_NAMES, TraitParams
from qtm.recursion import trajectory

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}


def _obs(seed=0, shape=(2, 4, 40)):
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.05 * rng.standard_normal(shape)
    x[:, 0] = x[0, 0]
    return from_phenotypes(["a", "b"], np.arange(shape[1]), x)


@pytest.fixture(scope="module")
def problem():
    return build_problem(_obs(), ModelSpec())


def test_cell_nll_is_the_density_of_the_sufficient_statistics():
    # Reference: scipy's normal density of xbar and chi2 density of (n-1) s^2 / V with its Jacobian.
    mu, var, n, xbar, s2 = 0.3, 0.0025, 40.0, 0.31, 0.0021
    q = (n - 1) * s2 / var
    expected = -(scipy.stats.norm.logpdf(xbar, mu, math.sqrt(var / n))
                 + scipy.stats.chi2.logpdf(q, n - 1) + math.log((n - 1) / var))
    assert float(cell_nll(mu, var, n, xbar, s2)) == pytest.approx(expected, rel=1e-12)
    assert float(cell_nll(mu, var, n, xbar, s2, xp=np)) == pytest.approx(expected, rel=1e-12)
    # n = 1: the mean term only.
    assert float(cell_nll(mu, var, 1.0, xbar, 0.0)) == pytest.approx(-scipy.stats.norm.logpdf(xbar, mu, math.sqrt(var)))


def test_likelihood_differences_equal_those_of_the_per_image_gaussian():
    # Sufficiency: the per-image log-likelihood differs from -cell_nll by a parameter-free constant.
    x = np.random.default_rng(1).normal(0.3, 0.05, 200)
    n, xbar, s2 = x.size, x.mean(), x.var(ddof=1)
    def full(mu, var):
        return scipy.stats.norm.logpdf(x, mu, math.sqrt(var)).sum()
    def stat(mu, var):
        return -float(cell_nll(mu, var, float(n), xbar, s2))
    for (m1, v1), (m2, v2) in (((0.3, 0.0025), (0.29, 0.003)), ((0.31, 0.002), (0.3, 0.0025))):
        assert full(m1, v1) - full(m2, v2) == pytest.approx(stat(m1, v1) - stat(m2, v2), rel=1e-9)


def test_objective_equals_direct_sum_over_qtm_trajectories(problem):
    # Reference: qtm.recursion.trajectory per condition, scipy densities per cell, iteration 0 once.
    obs = _obs()
    table = problem.fixed.copy()
    table[0, [IDX["r1"], IDX["r2"]]] = 0.6, 0.1
    table[1, [IDX["r1"], IDX["r2"]]] = 0.1, 0.5
    table[:, IDX["sigma_env"]] = 0.04
    u = to_unconstrained(table, problem)
    expected = 0.0
    for c in range(2):
        p = TraitParams(**{n: float(table[c, IDX[n]]) for n in PARAM_NAMES})
        tr = trajectory(p, 3)
        for k in range(0 if c == 0 else 1, 4):
            n = obs.num_images[c, k]
            mu, var = float(tr.mean[k]), float(tr.var_genetic[k])
            q = (n - 1) * obs.var[c, k] / var
            expected -= (scipy.stats.norm.logpdf(obs.mean[c, k], mu, math.sqrt(var / n))
                         + scipy.stats.chi2.logpdf(q, n - 1) + math.log((n - 1) / var))
    assert problem.nll(u) == pytest.approx(expected, rel=1e-10)


def test_gradient_matches_central_differences(problem):
    u = to_unconstrained(random_tables(problem, 1, key=jax.random.key(3))[0], problem)
    _, grad = problem.value_and_grad(u)
    h = 1e-6
    numeric = [(problem.nll(u + h * e) - problem.nll(u - h * e)) / (2 * h) for e in np.eye(u.size)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_transform_stays_on_the_simplex_and_inverts(problem):
    rng = np.random.default_rng(0)
    for _ in range(50):
        u = rng.normal(0, 4, problem.layout.size)
        table = problem.natural(u)
        r1, r2 = table[:, IDX["r1"]], table[:, IDX["r2"]]
        assert np.all(r1 > 0) and np.all(r2 > 0) and np.all(r1 + r2 < 1)
        np.testing.assert_allclose(to_unconstrained(table, problem), u, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(np.asarray(to_natural(jnp.asarray(u), problem.fixed, problem.scale,
                                                         problem.layout)), table, rtol=1e-13)


def test_single_free_window_edge_uses_the_remaining_mass():
    prob = build_problem(_obs(), ModelSpec(fixed=(("r2", 0.3),)))
    assert ("r2", 0) not in prob.layout.free
    table = prob.natural(np.full(prob.layout.size, 8.0))
    assert np.all(table[:, IDX["r1"]] < 0.7) and np.all(table[:, IDX["r1"]] > 0.69)
    assert np.all(table[:, IDX["r2"]] == 0.3)


def test_report_jacobian_matches_analytic_logit_derivative(problem):
    u = to_unconstrained(random_tables(problem, 1, key=jax.random.key(5))[0], problem)
    jr, jn = report_jacobian(u, problem.fixed, problem.scale, problem.layout)
    table = problem.natural(u)
    i = problem.layout.free.index(("r1", 0))
    j = problem.layout.free.index(("r2", 0))
    r1, r2 = table[0, IDX["r1"]], table[0, IDX["r2"]]
    # softmax: dr1/dz1 = r1 (1 - r1), dr1/dz2 = -r1 r2
    assert jn[i, i] == pytest.approx(r1 * (1 - r1), rel=1e-6)
    assert jn[i, j] == pytest.approx(-r1 * r2, rel=1e-6)
    assert jr[i, i] == pytest.approx(jn[i, i] / (r1 * (1 - r1)), rel=1e-6)


def test_profile_embedding_pins_the_report_value(problem):
    u = to_unconstrained(random_tables(problem, 1, key=jax.random.key(7))[0], problem)
    for index in range(problem.layout.size):
        name, c = problem.layout.free[index]
        g = float(report_scale(name, free_values(problem.natural(u), problem.layout)[index])) + 0.3
        w = reduce_vector(u, index)
        value, grad = profile_value_and_grad(problem, w, g, index)
        full, _, _ = embed(problem, w, g, index)
        pinned = free_values(problem.natural(full), problem.layout)[index]
        assert float(report_scale(name, pinned)) == pytest.approx(g, rel=1e-9, abs=1e-9)
        np.testing.assert_array_equal(np.delete(full, index), w)
        assert value == pytest.approx(problem.nll(full), rel=1e-12)
        # Reference gradient: central differences of the pinned objective in w.
        h = 1e-6
        numeric = [(profile_value_and_grad(problem, w + h * e, g, index)[0]
                    - profile_value_and_grad(problem, w - h * e, g, index)[0]) / (2 * h) for e in np.eye(w.size)]
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_failed_start_reports_status_instead_of_raising(problem):
    bad = np.full(problem.layout.size, np.nan)
    result = local_minimize(problem, bad)
    assert result.status == "failed" and "not finite" in result.message


@pytest.mark.parametrize("spec, needle, parameters", [
    (ModelSpec(free=("r1", "tail_rate")), "selection soft", ("selection",)),
    (ModelSpec(free=("r1", "sigma_mut")), "mutation paper", ("mutation",)),
    (ModelSpec(free=("r3",)), "free: unknown parameter", ("free",)),
    (ModelSpec(fixed=(("r1", 1.2),)), "fixed r1", ("fixed",)),
    (ModelSpec(selection="medium"), "selection must be one of", ("selection",)),
    (ModelSpec(objective="l1"), "objective must be one of", ("objective",)),
    (ModelSpec(free=("r1",), fixed=(("r1", 0.3),)), "no free parameter", ("free", "fixed")),
    (ModelSpec(selection="soft", fixed=(("tail_rate", math.inf),)), "fixed tail_rate", ("fixed", "selection")),
])
def test_spec_errors_name_the_field(spec, needle, parameters):
    """ModelSpec's own terms (its field names); the shell shows its flags for them (tests/commands)."""
    with pytest.raises(ModelError, match=needle) as info:
        spec.validate()
    assert info.value.parameters == parameters and "--" not in str(info.value)


def test_default_free_set_follows_the_model():
    assert ModelSpec().free_names() == ("r1", "r2", "mu0", "sigma_g0", "sigma_env")
    assert set(ModelSpec(selection="soft", mutation="additive").free_names()) == {
        "r1", "r2", "tail_rate", "sigma_mut", "mu0", "sigma_g0", "sigma_env"}
    assert "tail_rate" in ModelSpec(selection="soft", free=("r1", "r2", "tail_rate")).free_names()
    prob = build_problem(_obs(), ModelSpec(shared=("sigma_env",)))
    # mu0 and sigma_g0 stay shared (iteration 0 is common); sigma_env shared by request; r's per condition.
    assert prob.layout.free[:3] == (("mu0", -1), ("sigma_g0", -1), ("sigma_env", -1))
    prob = build_problem(_obs(), ModelSpec(shared=("mu0",)))
    assert ("sigma_env", 0) in prob.layout.free and ("sigma_env", 1) in prob.layout.free


def test_zero_variance_cell_keeps_its_mean_term_only():
    """A cell of identical values (s^2 = 0, n >= 2) is scored by its mean alone: -log N(xbar; mu, V / n)
    (scipy), whatever V is; before, s^2 was replaced by 1 and the chi-square term rewarded a large V."""
    mu, n, xbar = 0.3, 40.0, 0.31
    for var in (1e-4, 0.0025, 1.0):
        expected = -scipy.stats.norm.logpdf(xbar, mu, math.sqrt(var / n))
        assert float(cell_nll(mu, var, n, xbar, 0.0)) == pytest.approx(expected, rel=1e-12)
        assert float(cell_nll(mu, var, n, xbar, 0.0, xp=np)) == pytest.approx(expected, rel=1e-12)


def test_constant_data_is_refused():
    from fitting.errors import ConstantDataError

    x = np.full((2, 4, 30), 0.25)
    with pytest.raises(ConstantDataError, match="zero variance") as info:
        build_problem(from_phenotypes(["a", "b"], np.arange(4), x), ModelSpec())
    assert info.value.parameters == ("objective",)
    assert "--objective least-squares" in info.value.message({"objective": "--objective"})


def test_more_free_parameters_than_statistics_is_refused():
    """Two conditions, iterations 0..2, one image per cell: 1 pooled iteration-0 mean + 2 x 2 later means
    = 5 statistics (no variances with n = 1) against 7 free parameters (r1, r2 per condition; mu0,
    sigma_g0, sigma_env)."""
    from fitting.model import num_data_statistics
    from fitting.observations import cell_statistics

    x = np.random.default_rng(3).normal(0.3, 0.05, (2, 3, 1))
    x[1, 0] = x[0, 0]                                   # iteration 0 is the same image in both conditions
    obs = from_phenotypes(["a", "b"], np.arange(3), x)
    assert num_data_statistics(cell_statistics(obs)) == 5
    from fitting.errors import UnderdeterminedError

    with pytest.raises(UnderdeterminedError, match="7 free parameters but only 5 observed statistics") as info:
        build_problem(obs, ModelSpec())
    assert info.value.parameters == ("fixed",)
    build_problem(obs, ModelSpec(fixed=(("r1", 0.1),)))   # 5 free parameters (r2 x 2, shared 3): allowed


def test_strong_correlations_are_named():
    from fitting.uncertainty import strong_correlations

    corr = np.array([[1.0, 0.96, 0.2], [0.96, 1.0, -0.97], [0.2, -0.97, 1.0]])
    assert strong_correlations(corr, ("r1", "r2", "sigma_env")) == [("r2", "sigma_env", -0.97),
                                                                     ("r1", "r2", 0.96)]
    assert strong_correlations(np.array([[1.0, np.nan], [np.nan, 1.0]]), ("a", "b")) == []
