"""fitting.recommend: the curves, the recursion's predictions against a direct scipy computation, the whole
pipeline on synthetic pilots with known windows (guidance schedules too), strict JSON, and the comparison
with a study."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import special, stats

from fitting.recommend import (DEFAULT_HERITABILITY, PilotData, RecommendConfig, RecommendError, ScheduleData,
                               compare_with_study, drift_per_iteration, fit_window_curve, predict_chain, recommend,
                               recommendation_json, window_curve)

SCALES = np.array([1.0, 1.5, 2.5, 5.0, 7.5])
A1, B1, A2, B2 = -3.0, 1.0, -4.0, 1.8  # r1(s), r2(s) = expit(a + b log s); r1 + r2 < 1 on the grid
BALANCED = math.exp((A1 - A2) / (B2 - B1))  # r1 = r2 (Theorem 1: no drift), about 3.49


def synthetic_pilot(n: int = 600, seed: int = 0, curves=(A1, B1, A2, B2), schedules=None) -> PilotData:
    """Reference ~ N(0.3, 0.05^2); guided image i at scale s is reference image i pushed into the window
    (r1(s), 1 - r2(s)) by the quantile map, so the guided set is exactly the truncated law, paired by seed.
    D_0 is the reference set itself (the base model reproduces D_0). `schedules` {name: (r1, r2)}: guided
    sets made the same way from a known window each (mean scale 3, an arbitrary placing)."""
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.05 * rng.standard_normal(n)
    u = stats.norm.cdf((x - 0.3) / 0.05)

    def truncated(r1, r2):
        r1, r2 = np.asarray(r1, float), np.asarray(r2, float)
        return 0.3 + 0.05 * stats.norm.ppf(r1[..., None] + (1 - r1 - r2)[..., None] * u)

    a1, b1, a2, b2 = curves
    guided = truncated(window_curve(SCALES, a1, b1), window_curve(SCALES, a2, b2))
    sched = tuple(ScheduleData(name, {"schedule": "exponential", "scale": 7.5, "alpha": 2.0}, 3.0, truncated(*w))
                  for name, w in (schedules or {}).items())
    return PilotData(SCALES, guided, x, x.copy(), schedules=sched)


def test_window_curve_is_the_logistic_in_log_s():
    assert np.allclose(window_curve(SCALES, A1, B1), 1 / (1 + np.exp(-(A1 + B1 * np.log(SCALES)))))


def test_fit_window_curve_recovers_exact_curves():
    r = np.stack([window_curve(SCALES, A1, B1), window_curve(SCALES, A2, B2)])
    a, b = fit_window_curve(SCALES, r)
    assert np.allclose(a, [A1, A2], atol=1e-4) and np.allclose(b, [B1, B2], atol=1e-4)
    a, b = fit_window_curve(SCALES, np.array([[np.nan] * 4 + [0.2]]))
    assert np.isnan(a[0]) and np.isnan(b[0])


def direct_chain(r1, r2, h2, mean, var_p, K):
    """The recursion written out with scipy's truncated normal (paper mode, no mutation): D_k = mu_{k-1} +
    sd_P * E[Z | window], mu_k = mu_{k-1} + h2_{k-1} S_{k-1}, V_G,k = V_P,k-1 Var[Z | window]."""
    lo, hi = stats.norm.ppf(r1), stats.norm.ppf(1 - r2)
    m_sel, v_sel = stats.truncnorm.mean(lo, hi), stats.truncnorm.var(lo, hi)
    var_g, var_e, mu, out = h2 * var_p, (1 - h2) * var_p, mean, []
    for _ in range(K):
        vp = var_g + var_e
        s = math.sqrt(vp) * m_sel
        out.append(mu + s)
        mu, var_g = mu + var_g / vp * s, vp * v_sel
    return np.array(out)


@pytest.mark.parametrize("r1, r2, h2", [(0.05, 0.3, 0.05), (0.4, 0.1, 0.5), (0.2, 0.2, 1.0), (0.01, 0.6, 0.3)])
def test_predict_chain_against_the_recursion_written_out(r1, r2, h2):
    got = predict_chain(r1, r2, heritability=h2, mean=0.3, var_phenotype=0.0025, num_iterations=5)
    assert np.allclose(got, direct_chain(r1, r2, h2, 0.3, 0.0025, 5), rtol=0, atol=1e-10)


def test_centred_window_has_no_drift_and_broadcasts():
    got = predict_chain(np.array([0.1, 0.3]), np.array([0.1, 0.3]), heritability=0.4, mean=1.0, var_phenotype=1.0,
                        num_iterations=4)
    assert got.shape == (2, 4) and np.allclose(got, 1.0, atol=1e-12)
    assert np.allclose(drift_per_iteration(np.array([[1.0, 2.0, 4.0]])), [1.5])


@pytest.fixture(scope="module")
def synthetic_recommendation():
    return recommend(synthetic_pilot(), RecommendConfig(num_iterations=6, num_bootstrap=100),
                     rng=np.random.default_rng(1))


def test_pipeline_recovers_windows_curves_and_the_balanced_scale(synthetic_recommendation):
    rec = synthetic_recommendation
    for name, (a, b) in (("r1", (A1, B1)), ("r2", (A2, B2))):
        truth = window_curve(SCALES, a, b)
        lo, hi = rec.interval(name)
        assert np.all((lo - 0.01 <= truth) & (truth <= hi + 0.01)), (name, lo, truth, hi)
        assert np.max(np.abs(rec.estimate[name] - truth)) < 0.03
        fitted = window_curve(rec.grid, rec.estimate["a" + name[1]], rec.estimate["b" + name[1]])
        assert np.max(np.abs(fitted - window_curve(rec.grid, a, b))) < 0.03
    # D_0 = the reference set: the closest chain is the one without drift, at the balanced scale
    assert abs(math.log(rec.estimate["recommended"] / BALANCED)) < 0.1
    lo, hi = rec.interval("recommended")
    assert lo <= BALANCED <= hi and hi / lo < 2.5
    # the drift changes sign across the balanced scale: up (r1 > r2) below it, down above it
    drift = rec.estimate["drift"]
    assert np.all(drift[SCALES < BALANCED] > 0) and np.all(drift[SCALES > BALANCED] < 0)
    assert rec.heritability_source == "default" and len(rec.sensitivity) == 6
    # exact truncation: the differential the window implies is the measured one
    assert np.allclose(rec.estimate["selection_differential_predicted"], rec.estimate["selection_differential"],
                       atol=0.1 * 0.05)


def test_measured_heritability_is_the_pooled_response_over_selection():
    pilot = synthetic_pilot(n=200)
    differential = pilot.guided.mean(axis=1) - pilot.reference.mean()
    nxt = pilot.reference[None] + 0.3 * differential[:, None]  # every next model inherits 30 % of S
    data = PilotData(SCALES, pilot.guided, pilot.reference, pilot.originals, reference_next=nxt)
    rec = recommend(data, RecommendConfig(num_bootstrap=20), rng=np.random.default_rng(0))
    assert rec.heritability_source == "measured"
    assert rec.estimate["heritability"] == pytest.approx(0.3, abs=1e-9)
    assert rec.sensitivity == []


def test_json_is_strict_and_has_the_issue_shape(synthetic_recommendation):
    out = recommendation_json(synthetic_recommendation, {"pilot": {"seconds": float("nan")}})
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["scales"] == SCALES.tolist()
    assert set(back["r1"][0]) == {"estimate", "lower", "upper"} and len(back["r2"]) == 5
    assert len(back["predicted_drift"]) == 5
    assert set(back["recommended"]) == {"scale", "lower", "upper", "schedule", "bootstrap_support"}
    # no schedule competes: the recommendation is the best constant scale, in every replicate
    assert back["recommended"]["schedule"] is None and back["schedules"] == []
    assert {k: back["recommended"][k] for k in ("scale", "lower", "upper")} == back["best_constant_scale"]
    assert back["recommended"]["bootstrap_support"] == 1.0
    assert back["cost"]["pilot"]["seconds"] is None


def test_bad_pilots_are_refused():
    pilot = synthetic_pilot(n=50)
    with pytest.raises(RecommendError, match="scales"):
        recommend(PilotData(SCALES[:2], pilot.guided[:2], pilot.reference, pilot.originals),
                  rng=np.random.default_rng())
    with pytest.raises(RecommendError, match="increasing"):
        recommend(PilotData(SCALES[::-1], pilot.guided, pilot.reference, pilot.originals), rng=np.random.default_rng())
    with pytest.raises(RecommendError, match="num_iterations"):
        RecommendConfig(num_iterations=1).validate()


def test_compare_with_study():
    rec = {"scales": [1.0, 1.5, 2.5, 5.0], "predicted_drift": [0.04, -0.01, 0.002, -0.03],
           "recommended": {"scale": 2.2, "lower": 1.5, "upper": 3.0}}
    measured = {1.0: 5.0, 1.5: 2.0, 2.5: 1.0, 5.0: 3.0, 7.5: 9.0}  # same order as |drift|
    got = compare_with_study(rec, measured)
    assert got["spearman"] == pytest.approx(1.0)
    assert got["nearest_pilot_scale"] == 2.5 and got["best_two_measured"] == [2.5, 1.5]
    assert got["recommended_among_best_two"] is True
    reversed_rates = {1.0: 1.0, 1.5: 3.0, 2.5: 5.0, 5.0: 2.0}
    got = compare_with_study(rec, reversed_rates)
    assert got["spearman"] == pytest.approx(-1.0) and got["recommended_among_best_two"] is False
    assert got["spearman"] == pytest.approx(stats.spearmanr([0.04, 0.01, 0.002, 0.03], [1, 3, 5, 2])[0])
    with pytest.raises(RecommendError, match="at least 3"):
        compare_with_study(rec, {1.0: 1.0, 7.5: 2.0})


# ------------------------------------------------------------------------------------------------ schedules

SCHEDULE_WINDOW = (0.15, 0.05)


@pytest.fixture(scope="module")
def schedule_recommendation():
    pilot = synthetic_pilot(schedules={"redifine": SCHEDULE_WINDOW})
    return pilot, recommend(pilot, RecommendConfig(num_iterations=6, num_bootstrap=100), rng=np.random.default_rng(1))


def test_schedule_window_is_recovered_and_predicted_by_the_recursion_written_out(schedule_recommendation):
    pilot, rec = schedule_recommendation
    for name, truth in zip(("schedule_r1", "schedule_r2"), SCHEDULE_WINDOW):
        lo, hi = rec.interval(name)
        assert abs(rec.estimate[name][0] - truth) < 0.03
        assert lo[0] - 0.01 <= truth <= hi[0] + 0.01, (name, lo, truth, hi)
    # the schedule's trajectory: the recursion written by hand at its assayed window, from the reference set
    r1, r2 = rec.estimate["schedule_r1"][0], rec.estimate["schedule_r2"][0]
    x = pilot.reference
    expected = direct_chain(r1, r2, DEFAULT_HERITABILITY, x.mean(), x.var(ddof=1), 6)
    assert np.allclose(rec.estimate["schedule_phenotype"][0], expected, rtol=0, atol=1e-10)
    assert rec.estimate["schedule_drift"][0] == pytest.approx((expected[-1] - expected[0]) / 5, abs=1e-10)
    d0 = pilot.originals
    assert rec.estimate["schedule_distance"][0] == pytest.approx(
        np.mean(np.abs(expected - d0.mean())) / d0.std(ddof=1), abs=1e-9)
    # exact truncation: the measured differential is the one its window implies
    assert rec.estimate["schedule_selection_differential"][0] == pytest.approx(
        rec.estimate["schedule_selection_differential_predicted"][0], abs=0.1 * 0.05)


def test_a_schedule_does_not_change_the_scales_results(schedule_recommendation, synthetic_recommendation):
    _, rec = schedule_recommendation
    for name in ("r1", "r2", "a1", "b1", "a2", "b2", "drift", "distance", "recommended"):
        assert np.array_equal(rec.estimate[name], synthetic_recommendation.estimate[name]), name
    # the balanced scale keeps the chain nearer D_0 than the one-sided schedule: no schedule wins
    assert rec.winner is None and rec.estimate["choice"] == -1
    out = json.loads(json.dumps(recommendation_json(rec), allow_nan=False))
    assert out["recommended"]["schedule"] is None and out["recommended"]["scale"] == out["best_constant_scale"]["scale"]
    (entry,) = out["schedules"]
    assert entry["name"] == "redifine" and entry["parameters"] == {"schedule": "exponential", "scale": 7.5, "alpha": 2.0}
    assert set(entry) >= {"name", "parameters", "r1", "r2", "predicted_drift", "distance", "mean_scale"}
    assert entry["predicted_drift"] == pytest.approx(float(rec.estimate["schedule_drift"][0]))
    assert entry["bootstrap_wins"] == pytest.approx(float(np.mean(rec.replicates["choice"] == 0)))


def test_a_centred_schedule_beats_one_sided_scales():
    # every constant scale cuts the low tail only (r2 ~ 0): all of them drift up; the schedule's window is centred
    pilot = synthetic_pilot(curves=(A1, B1, -8.0, 0.0), schedules={"left": (0.3, 0.02), "centred": (0.1, 0.1)})
    rec = recommend(pilot, RecommendConfig(num_iterations=6, num_bootstrap=60), rng=np.random.default_rng(2))
    assert rec.winner == "centred" and rec.support() > 0.9
    distance = rec.estimate["schedule_distance"]
    assert distance[1] < np.min(rec.estimate["grid_distance"]) < distance[0]
    assert abs(rec.estimate["schedule_drift"][1]) < 0.1 * abs(rec.estimate["drift"][0])
    out = json.loads(json.dumps(recommendation_json(rec), allow_nan=False))
    assert out["recommended"] == {"scale": None, "lower": None, "upper": None, "schedule": "centred",
                                  "bootstrap_support": pytest.approx(rec.support())}
    assert out["best_constant_scale"]["scale"] == 1.0  # the weakest one-sided cut
    assert [e["name"] for e in out["schedules"]] == ["left", "centred"]
    assert all(row["recommended_schedule"] == "centred" for row in out["heritability_sensitivity"])
    # a study check ranks the constant scales: it uses the best constant scale
    assert compare_with_study(out, {1.0: 1.0, 1.5: 2.0, 2.5: 3.0})["nearest_pilot_scale"] == 1.0


def test_schedule_response_is_its_own_and_stays_out_of_the_pooled_heritability():
    pilot = synthetic_pilot(n=200, schedules={"q": SCHEDULE_WINDOW})
    differential = pilot.guided.mean(axis=1) - pilot.reference.mean()
    nxt = pilot.reference[None] + 0.3 * differential[:, None]
    (q,) = pilot.schedules
    s_q = q.guided.mean() - pilot.reference.mean()
    q = dataclasses.replace(q, reference_next=pilot.reference + 0.8 * s_q)  # e.g. a condition drop's finetuning
    data = dataclasses.replace(pilot, reference_next=nxt, schedules=(q,))
    rec = recommend(data, RecommendConfig(num_bootstrap=20), rng=np.random.default_rng(0))
    assert rec.estimate["heritability"] == pytest.approx(0.3, abs=1e-9)
    assert rec.estimate["schedule_heritability_realized"][0] == pytest.approx(0.8, abs=1e-9)
    assert rec.estimate["schedule_response"][0] == pytest.approx(0.8 * s_q, abs=1e-12)
    entry = recommendation_json(rec)["schedules"][0]
    assert entry["heritability_realized"]["estimate"] == pytest.approx(0.8) and "note" not in entry


def test_bad_schedules_are_refused():
    pilot = synthetic_pilot(n=50, schedules={"a": SCHEDULE_WINDOW})
    (a,) = pilot.schedules
    with pytest.raises(RecommendError, match="distinct"):
        recommend(dataclasses.replace(pilot, schedules=(a, a)), rng=np.random.default_rng())
    with pytest.raises(RecommendError, match="shape"):
        recommend(dataclasses.replace(pilot, schedules=(dataclasses.replace(a, guided=a.guided[:10]),)),
                  rng=np.random.default_rng())
    with pytest.raises(RecommendError, match="reference_next"):
        recommend(dataclasses.replace(pilot, reference_next=np.zeros((5, 50))), rng=np.random.default_rng())
