"""The figures the commands write, checked on the matplotlib objects drawn (each module's save_figure is
wrapped to keep the figure): whole-number iteration ticks, tau marked on the spectra with plain-decimal
frequency ticks, one legend per figure where promised, bands inside the phenotype's support [0, 1], and
"not identified" written on the panel of every parameter a fit marks so (and on no other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qtm.params import PARAM_NAMES


def _capture(monkeypatch, module) -> list:
    """Keep every figure `module` saves (it still writes the file)."""
    figures = []
    real = module.save_figure

    def save(fig, path, **kwargs):
        figures.append(fig)
        return real(fig, path, **kwargs)

    monkeypatch.setattr(module, "save_figure", save)
    return figures


def _visible_ticks(ax, axis: str = "x") -> np.ndarray:
    ticks = np.asarray(ax.get_xticks() if axis == "x" else ax.get_yticks(), float)
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    return ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]


def _assert_integer_iteration_axis(ax) -> None:
    ticks = _visible_ticks(ax)
    assert ax.get_xlabel() == "iteration"
    assert ticks.size >= 2 and np.all(ticks == np.round(ticks)), ticks


def _band_edges(ax) -> np.ndarray:
    """The y values of every filled band (fill_between) of an axes."""
    from matplotlib.collections import PolyCollection

    ys = [path.vertices[:, 1] for c in ax.collections if isinstance(c, PolyCollection) for path in c.get_paths()]
    return np.concatenate(ys) if ys else np.array([])


def _texts(fig, gid: str | None = None) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts if gid is None or t.get_gid() == gid]


# ----------------------------------------------------------------------------------------- the run's figures

def _metrics(tau: float | None = 0.16, num_iterations: int = 3) -> xr.Dataset:
    rng = np.random.default_rng(0)
    k = num_iterations
    freq = np.arange(17) / 32
    hf = rng.uniform(0.0, 0.05, (2, k, 6))
    hf[..., 0] = 0.5  # one bright image a cell: mean - sd < 0
    attrs = {"schema_version": 1} | ({"phenotype_tau": tau} if tau is not None else {})
    return xr.Dataset(
        {"hf_power": (("condition", "iteration", "image"), hf),
         "radial_psd": (("condition", "iteration", "frequency"), rng.uniform(1e-4, 1, (2, k, 17))),
         "fd_dinov2": (("condition", "iteration"), rng.uniform(0, 9, (2, k))),
         "recall": (("condition", "iteration"), rng.uniform(0, 1, (2, k))),
         "recall_lower": (("condition", "iteration"), np.full((2, k), -0.5)),
         "recall_upper": (("condition", "iteration"), np.full((2, k), 1.5))},
        coords={"condition": ["low", "high"], "iteration": np.arange(k), "image": np.arange(6),
                "frequency": freq}, attrs=attrs)


def test_radial_spectra_mark_tau_with_plain_ticks_and_one_legend(monkeypatch, tmp_path):
    from chain import report

    figures = _capture(monkeypatch, report)
    report.plot_radial_spectra(_metrics(tau=0.16), tmp_path / "s.png")
    fig = figures[-1]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["iteration 0 (original images)", "iteration 1", "iteration 2"]
    assert any("tau = 0.16" in label for label in labels)
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        tau_lines = [line for line in ax.get_lines() if np.allclose(line.get_xdata(), 0.16)]
        assert len(tau_lines) == 1
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert shown == ["0.05", "0.1", "0.2", "0.5"]  # plain decimals, no 10^n, no minor labels
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["low", "high"] and fig.get_suptitle() not in titles


def test_radial_spectra_without_tau_draw_no_tau_line(monkeypatch, tmp_path):
    from chain import report

    figures = _capture(monkeypatch, report)
    report.plot_radial_spectra(_metrics(tau=None), tmp_path / "s.png")
    assert not any("tau" in t.get_text() for t in figures[-1].legends[0].get_texts())


@pytest.mark.parametrize("num_iterations", [2, 3, 7])
def test_per_iteration_figures_have_whole_number_ticks_and_bars_inside_the_support(monkeypatch, tmp_path,
                                                                                  num_iterations):
    from chain import report

    figures = _capture(monkeypatch, report)
    metrics = _metrics(num_iterations=num_iterations)
    report.plot_phenotype(metrics, tmp_path / "p.png")
    report.plot_metric(metrics, "recall", tmp_path / "r.png")
    report.plot_metric(metrics, "fd_dinov2", tmp_path / "f.png")
    for fig in figures:
        _assert_integer_iteration_axis(fig.axes[0])
    # phenotype: sd bars of values near 0 would cross 0; they stop at the support's edge
    from matplotlib.collections import LineCollection

    bars = [seg for c in figures[0].axes[0].collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert bars and min(seg[:, 1].min() for seg in bars) >= 0.0
    assert min(seg[:, 1].min() for seg in bars) == 0.0  # the data's sd does reach below 0: clipped, not absent
    edges = _band_edges(figures[1].axes[0])  # recall's interval (-0.5, 1.5) kept inside [0, 1]
    assert edges.size and edges.min() >= 0.0 and edges.max() <= 1.0
    assert "recall" in figures[1].axes[0].get_ylabel()


# ------------------------------------------------------------------------------------------------ the fit

def hand_fit(*, unidentified: dict[str, str] | None = None, num_iterations: int = 4) -> xr.Dataset:
    """A fit.nc written by hand: bands around a falling mean that cross 0 (a wide prediction band, as an
    unidentified fit draws), r1 and r2 free, `unidentified` {condition: parameter} marked not identified."""
    conditions = ["low", "high"]
    names = list(PARAM_NAMES)
    k = np.arange(num_iterations + 1)
    mean = np.vstack([0.05 - 0.01 * k, 0.05 + 0.01 * k])
    free = np.zeros((2, len(names)), bool)
    free[:, [names.index("r1"), names.index("r2")]] = True
    identified = np.ones_like(free)
    for condition, parameter in (unidentified or {}).items():
        identified[conditions.index(condition), names.index(parameter)] = False
    cp, ci = ("condition", "parameter"), ("condition", "iteration")
    values = np.full((2, len(names)), 0.2)
    return xr.Dataset(
        {"estimate": (cp, values), "lower": (cp, values - 0.3), "upper": (cp, values + 0.9),
         "free": (cp, free), "identified": (cp, identified),
         "observed_mean": (ci, mean), "observed_sd": (ci, np.full(mean.shape, 0.02)),
         "observed_num_images": (ci, np.full(mean.shape, 50)), "train": (("iteration",), np.ones(k.size, bool)),
         "fitted_mean": (ci, mean), "mean_lower": (ci, mean - 0.08), "mean_upper": (ci, mean + 0.08),
         "predict_lower": (ci, mean - 0.5), "predict_upper": (ci, mean + 1.2)},
        coords={"condition": conditions, "iteration": k, "parameter": names},
        attrs={"fit_schema_version": 1, "model": "hard", "mutation": "none", "interval": "laplace"})


def test_fit_figure_keeps_bands_in_the_support_and_names_unidentified_parameters(monkeypatch, tmp_path):
    from fitting import plotting

    figures = _capture(monkeypatch, plotting)
    plotting.plot_fit_dataset(hand_fit(unidentified={"high": "r2"}), tmp_path / "fit.png")
    fig = figures[-1]
    low, high = fig.axes[0], fig.axes[1]
    for ax in (low, high):
        edges = _band_edges(ax)
        assert edges.size and edges.min() >= 0.0 and edges.max() <= 1.0
        _assert_integer_iteration_axis(ax)
        assert ax.get_legend() is None
    assert len(fig.legends) == 1
    assert [t.get_text() for t in low.texts if t.get_gid() == "not-identified"] == []
    assert [t.get_text() for t in high.texts if t.get_gid() == "not-identified"] == ["not identified: r2"]
    assert "hard truncation selection" in fig.get_suptitle()


def test_fit_figure_without_unidentified_parameters_says_nothing(monkeypatch, tmp_path):
    from fitting import plotting

    figures = _capture(monkeypatch, plotting)
    plotting.plot_fit_dataset(hand_fit(), tmp_path / "fit.png")
    assert _texts(figures[-1], "not-identified") == []


# ---------------------------------------------------------------------------------------------- the assay

@pytest.fixture(scope="module")
def assay():
    from fitting.assay import AssayConfig, assay_dataset, assay_input_from_dataset, run_assay
    from tests.fitting.testdata import selection_experiment

    metrics = selection_experiment({"low": (0.05, 0.4), "high": (0.3, 0.05)}, num_iterations=4, num_images=200)
    metrics = metrics.assign_coords(condition=["low", "high"])
    data = assay_input_from_dataset(metrics, source="test")
    return assay_dataset(run_assay(data, AssayConfig(num_bootstrap=50), rng=np.random.default_rng(0), seed=0))


def test_assay_figure_has_integer_iteration_ticks_and_one_legend(monkeypatch, tmp_path, assay):
    from fitting import assay_plotting

    figures = _capture(monkeypatch, assay_plotting)
    assay_plotting.plot_assay_dataset(assay, tmp_path / "assay.png")
    fig = figures[-1]
    axes = np.array(fig.axes).reshape(4, -1)
    for ax in axes[:3].ravel():
        _assert_integer_iteration_axis(ax)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)


def test_heritability_over_a_zero_differential_does_not_set_the_scale(monkeypatch, tmp_path, assay):
    from fitting import assay_plotting

    ds = assay.copy(deep=True)
    ds["heritability"][0, 0] = -2.7e6  # R / S with S ~ 0
    ds["heritability_meaningful"][0, 0] = False
    figures = _capture(monkeypatch, assay_plotting)
    assay_plotting.plot_assay_dataset(ds, tmp_path / "assay.png")
    ax = np.array(figures[-1].axes).reshape(4, -1)[2][0]
    assert ax.get_ylim()[0] > -100  # the meaningful values and [0, 1] set the range
    assert any("off scale" in t.get_text() for t in ax.texts)


def test_routes_figure_marks_the_fit_parameters_it_could_not_identify(monkeypatch, tmp_path, assay):
    from fitting import assay_plotting

    fit = hand_fit(unidentified={"low": "r1"}, num_iterations=int(assay["iteration"].max()))
    figures = _capture(monkeypatch, assay_plotting)
    assay_plotting.plot_routes(assay, fit, tmp_path / "routes.png")
    axes = np.array(figures[-1].axes).reshape(2, -1)
    marked = [[[t.get_text() for t in ax.texts if t.get_gid() == "not-identified"] for ax in row] for row in axes]
    assert marked == [[["not identified: r1 (trajectory fit)"], []], [[], []]]
    for ax in axes.ravel():
        _assert_integer_iteration_axis(ax)
        edges = _band_edges(ax)
        assert edges.min() >= 0.0 and edges.max() <= 1.0  # the fit's interval (upper 1.1) cut at 1


# --------------------------------------------------------------------------------- simulate and recommend

def test_simulate_figure_has_integer_ticks_and_one_legend(monkeypatch, tmp_path):
    from qtm import plotting
    from typer.testing import CliRunner

    from qtm.cli import app

    figures = _capture(monkeypatch, plotting)
    result = CliRunner().invoke(app, ["simulate", "--r1", "0.3", "--r2", "0.05", "--iterations", "3",
                                      "--population", "20", "--replicates", "5", "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    fig = figures[-1]
    for ax in fig.axes:
        _assert_integer_iteration_axis(ax)
        assert ax.get_legend() is None
    assert len(fig.legends) == 1
    assert "r1 = 0.3" in fig.get_suptitle() and "N = 20" in fig.get_suptitle()


def test_recommend_figure_keeps_window_bands_in_0_1(monkeypatch, tmp_path):
    from fitting import recommend_plotting
    from fitting.recommend import RecommendConfig, recommend
    from tests.fitting.test_recommend import synthetic_pilot

    rec = recommend(synthetic_pilot(n=200), RecommendConfig(num_iterations=4, num_bootstrap=20),
                    rng=np.random.default_rng(1))
    figures = _capture(monkeypatch, recommend_plotting)
    recommend_plotting.plot_recommendation(rec, Path(tmp_path / "rec.png"))
    window, _, distance = figures[-1].axes
    edges = _band_edges(window)
    assert edges.min() >= 0.0 and edges.max() <= 1.0
    assert _band_edges(distance).min() >= 0.0
    assert "recommended scale" in [t.get_text() for t in window.get_legend().get_texts()]


def test_spectra_figure_marks_tau_with_plain_log_ticks(monkeypatch, tmp_path):
    from qtmio import figures as qtmio_figures

    from chain import spectra

    rng = np.random.default_rng(0)
    freq = np.arange(17) / 32
    ds = xr.Dataset({"hf_power": (("image",), rng.uniform(0, 1, 8)),
                     "radial_psd": (("image", "frequency"), rng.uniform(1e-4, 1, (8, 17))),
                     "angular_psd": (("image", "angle"), rng.uniform(0, 0.1, (8, 16)))},
                    coords={"frequency": freq, "angle": np.arange(16) * np.pi / 16}, attrs={"phenotype_tau": 0.16})
    figures = _capture(monkeypatch, qtmio_figures)  # plot_folder imports the saver when it draws
    spectra.plot_folder(ds, tmp_path / "s.png")
    radial = figures[-1].axes[1]
    assert radial.get_xscale() == "log" and radial.get_yscale() == "log"
    assert len([line for line in radial.get_lines() if np.allclose(line.get_xdata(), 0.16)]) == 1
    assert [t.get_text() for t in radial.get_xticklabels() if t.get_text()] == ["0.05", "0.1", "0.2", "0.5"]
