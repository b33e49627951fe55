"""The verification tier (verification/): its simulators against their definitions, and a small study."""

import numpy as np
import pytest

from verification.coverage import StudyResult
from verification.simulate import Truth, independent_draws, shared_origin_chains


def test_shared_origin_chains_share_d0_and_follow_the_monte_carlo():
    """Every condition starts from the same D_0; with r1 = r2 = 0 no selection happens, so the chain's
    variance only shrinks by the ML factor (N - 1) / N per iteration in expectation (MODEL.md section 5)."""
    truth = Truth(conditions=(("a", 0.5, 0.02), ("b", 0.05, 0.4)))
    x = shared_origin_chains(truth, num_images=400, num_iterations=3, seed=1)
    assert x.shape == (2, 4, 400)
    np.testing.assert_array_equal(x[0, 0], x[1, 0])
    # different windows select differently from the same D_0: the conditions' iteration-1 means move apart,
    # upward for r1 > r2 and downward for r1 < r2
    assert x[0, 1].mean() > x[0, 0].mean() > x[1, 1].mean()


def test_independent_draws_match_the_recursion():
    from qtm.recursion import trajectory

    truth = Truth(conditions=(("a", 0.5, 0.02),))
    x = independent_draws(truth, num_images=20000, num_iterations=2, seed=3)
    traj = trajectory(truth.params(0.5, 0.02), 2)
    np.testing.assert_allclose(x[0].mean(-1), np.asarray(traj.mean), atol=4 * 0.05 / np.sqrt(20000))
    np.testing.assert_allclose(x[0].var(-1, ddof=1), np.asarray(traj.var_genetic), rtol=0.05)


def test_study_summary_by_hand():
    truth = np.array([[1.0, 2.0]] * 4)
    est = np.array([[1.1, 2.0], [0.9, 2.5], [1.0, 1.0], [1.2, 2.2]])
    lo, up = est - 0.15, est + 0.15
    rows = StudyResult("t", ("a", "b"), truth, est, lo, up, np.ones(4)).summary()
    assert rows[0]["coverage"] == 0.75 and rows[1]["coverage"] == 0.25 and rows[2]["coverage"] == 0.5
    assert rows[0]["median_bias"] == pytest.approx(0.05) and rows[0]["median_half_width"] == pytest.approx(0.15)


def test_likelihood_ratio_summary_and_per_seed_rows_by_hand():
    """The truth's likelihood ratio against chi2_P: mean, sample variance and the fraction above the 95 %
    point (chi2_2(0.95) = -2 log 0.05 = 5.991), computed here by hand."""
    truth = np.zeros((4, 2))
    est = np.ones((4, 2))
    lr = np.array([1.0, 2.0, 7.0, np.inf])             # a non-finite ratio (a seed outside the domain) is dropped
    study = StudyResult("t", ("a", "b"), truth, est, est - 1, est + 1, np.arange(4.0), likelihood_ratio=lr)
    joint = study.likelihood_ratio_summary()
    assert joint["seeds"] == 3 and joint["free"] == 2 and joint["chi2_mean"] == 2 and joint["chi2_variance"] == 4
    assert joint["mean"] == pytest.approx(10 / 3)
    assert joint["variance"] == pytest.approx(((1 - 10 / 3) ** 2 + (2 - 10 / 3) ** 2 + (7 - 10 / 3) ** 2) / 2)
    assert joint["above_95"] == pytest.approx(1 / 3)          # only 7 > 5.991
    rows = study.per_seed_rows(first_seed=10)
    assert len(rows) == 8 and rows[0]["seed"] == 10 and rows[-1]["seed"] == 13
    assert rows[3]["parameter"] == "b" and rows[3]["seconds"] == 1.0 and rows[3]["likelihood_ratio"] == 2.0
    assert StudyResult("t", ("a",), truth[:, :1], est[:, :1], est[:, :1], est[:, :1],
                       np.ones(4)).likelihood_ratio_summary() is None


@pytest.mark.slow
def test_small_coverage_study_runs_and_covers(tmp_path):
    """A 4-seed version of `python -m verification` (chains sharing D_0, N = 300, K = 4): it writes its
    table and figure, and pooled coverage is not grossly off (the full study is the tier's own job)."""
    from verification.__main__ import main

    assert main(["--seeds", "4", "--images", "300", "--iterations", "4", "--studies", "chain",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "coverage.md").read_text()
    assert "| pooled |" in text and (tmp_path / "coverage_chain.png").stat().st_size > 0
    pooled = float(next(line for line in text.splitlines() if line.startswith("| pooled")).split("|")[2])
    assert pooled >= 0.7
    seeds = (tmp_path / "coverage_chain_seeds.csv").read_text().splitlines()
    assert len(seeds) == 1 + 4 * 9
    # the estimate minimizes the objective, so the truth's likelihood ratio is >= 0 (up to the optimizer's
    # tolerance)
    ratios = [float(line.split(",")[-1]) for line in seeds[1:]]
    assert min(ratios) > -1e-3 and "likelihood ratio of the truth" in text
