"""The results store: the chain's `metrics.nc`, a dataset of the results contract (qtmio.contract) with this
engine's extras.

Dimensions: condition (str), iteration (0 = D_0, k = images of M_k), image (index of the prompt/original
image; with several images per prompt, image = prompt * images_per_prompt + j), frequency, angle, plus this
engine's extras: step (sampling step), latent_bin.

Contract variables: cfg_scale, cfg_schedule, condition_drop (condition); hf_power (condition, iteration,
image; NaN = not produced); radial_psd (condition, iteration, frequency); angular_psd (condition, iteration,
angle); fd_dinov2, recall, sfd, clip_score (condition, iteration; NaN when not configured).
Extras: completed (condition, iteration; 1 once that cell is final), train_loss (mean loss over the last
tenth of the finetuning steps), num_images,
guidance_scale and guidance_diff_norm (condition, iteration, step; Appendix G.1: the mean over images of
|e_cond - e_uncond|), latent_histogram (condition, iteration, latent_bin; Appendix G.2) with
latent_bin_edges, image_prompt (image), hf_power_reference (condition, iteration, image; the selection
assay's reference set, chain.config.AssayConfig: NaN at iteration 0 and wherever not produced; a file written
before it existed gains it, all NaN, through `with_reference`).

The file is written and read with qtmio.netcdf (write_netcdf, read_netcdf): atomically, so a reader or a
killed writer never sees a half-written file.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from qtmio.contract import METRIC_NAMES, SCHEMA_VERSION


def empty_dataset(
    *,
    conditions: list[str],
    cfg_scale: list[float],
    cfg_schedule: list[str],
    condition_drop: list[float],
    num_iterations: int,
    num_images: int,
    images_per_prompt: int,
    frequencies: np.ndarray,
    angles: np.ndarray,
    num_steps: int,
    latent_bin_edges: np.ndarray,
    attrs: dict,
) -> xr.Dataset:
    """A dataset with every cell NaN (not produced) and `completed` 0."""
    c, k, n = len(conditions), num_iterations + 1, num_images
    nan = np.nan

    def full(*shape):
        return np.full(shape, nan, dtype=np.float64)

    coords = {
        "condition": np.array(conditions, dtype=object),
        "iteration": np.arange(k, dtype=np.int64),
        "image": np.arange(n, dtype=np.int64),
        "frequency": np.asarray(frequencies, dtype=np.float64),
        "angle": np.asarray(angles, dtype=np.float64),
        "step": np.arange(num_steps, dtype=np.int64),
        "latent_bin": np.arange(len(latent_bin_edges) - 1, dtype=np.int64),
    }
    data = {
        "cfg_scale": (("condition",), np.asarray(cfg_scale, dtype=np.float64)),
        "cfg_schedule": (("condition",), np.array(cfg_schedule, dtype=object)),
        "condition_drop": (("condition",), np.asarray(condition_drop, dtype=np.float64)),
        "hf_power": (("condition", "iteration", "image"), full(c, k, n)),
        "hf_power_reference": (("condition", "iteration", "image"), full(c, k, n)),
        "radial_psd": (("condition", "iteration", "frequency"), full(c, k, len(frequencies))),
        "angular_psd": (("condition", "iteration", "angle"), full(c, k, len(angles))),
        **{name: (("condition", "iteration"), full(c, k)) for name in METRIC_NAMES},
        "completed": (("condition", "iteration"), np.zeros((c, k), dtype=np.int8)),
        "train_loss": (("condition", "iteration"), full(c, k)),
        "num_images": (("condition", "iteration"), np.zeros((c, k), dtype=np.int64)),
        "guidance_scale": (("condition", "iteration", "step"), full(c, k, num_steps)),
        "guidance_diff_norm": (("condition", "iteration", "step"), full(c, k, num_steps)),
        "latent_histogram": (("condition", "iteration", "latent_bin"), full(c, k, len(latent_bin_edges) - 1)),
        "latent_bin_edges": (("latent_bin_edge",), np.asarray(latent_bin_edges, dtype=np.float64)),
        "image_prompt": (("image",), np.arange(n, dtype=np.int64) // max(images_per_prompt, 1)),
    }
    ds = xr.Dataset(data, coords=coords, attrs={"schema_version": SCHEMA_VERSION, **attrs})
    ds["hf_power"].attrs["description"] = "phenotype of each image (chain.spectra); NaN = not produced"
    _describe_reference(ds)
    ds["guidance_diff_norm"].attrs["description"] = "mean over images of the L2 norm of e_cond - e_uncond"
    ds["latent_histogram"].attrs["description"] = "counts of final latent values (all images) per bin"
    ds["completed"].attrs["description"] = "1 once the (condition, iteration) cell is final"
    return ds


def _describe_reference(ds: xr.Dataset) -> None:
    ds["hf_power_reference"].attrs["description"] = (
        "phenotype of the reference image of the same prompt and seed from the same model at the assay's "
        "reference scale (never trained on); NaN = not produced")


def with_reference(ds: xr.Dataset) -> xr.Dataset:
    """`ds` with hf_power_reference (all NaN) added if it lacks it (a file written before the assay)."""
    if "hf_power_reference" in ds:
        return ds
    ds = ds.copy()
    ds["hf_power_reference"] = xr.full_like(ds["hf_power"], np.nan)
    _describe_reference(ds)
    return ds


def record(
    ds: xr.Dataset,
    *,
    condition: str | None,
    iteration: int,
    hf_power: np.ndarray,
    radial_psd: np.ndarray,
    angular_psd: np.ndarray,
    metrics: dict[str, float] | None = None,
    train_loss: float = np.nan,
    guidance_scale: np.ndarray | None = None,
    guidance_diff_norm: np.ndarray | None = None,
    latent_histogram: np.ndarray | None = None,
    hf_power_reference: np.ndarray | None = None,
) -> xr.Dataset:
    """A copy of `ds` with one (condition, iteration) cell filled and marked completed. condition=None fills
    that iteration for every condition (iteration 0: the same real data for all). hf_power_reference: the
    phenotypes of the reference set (images 0 .. len - 1), if one was made."""
    ds = ds.copy(deep=True)
    conditions = list(ds.condition.values) if condition is None else [condition]
    n = len(hf_power)
    if n > ds.sizes["image"]:
        raise ValueError(f"{n} images but the image dimension has {ds.sizes['image']}")
    for cond in conditions:
        at = {"condition": cond, "iteration": iteration}
        row = np.full(ds.sizes["image"], np.nan)
        row[:n] = hf_power
        ds["hf_power"].loc[at] = row
        ds["radial_psd"].loc[at] = radial_psd
        ds["angular_psd"].loc[at] = angular_psd
        for name, value in (metrics or {}).items():
            ds[name].loc[at] = value
        ds["train_loss"].loc[at] = train_loss
        ds["num_images"].loc[at] = n
        if guidance_scale is not None:
            ds["guidance_scale"].loc[at] = guidance_scale
        if guidance_diff_norm is not None:
            ds["guidance_diff_norm"].loc[at] = guidance_diff_norm
        if latent_histogram is not None:
            ds["latent_histogram"].loc[at] = latent_histogram
        if hf_power_reference is not None:
            if len(hf_power_reference) > ds.sizes["image"]:
                raise ValueError(f"{len(hf_power_reference)} reference images but the image dimension has "
                                 f"{ds.sizes['image']}")
            ref = np.full(ds.sizes["image"], np.nan)
            ref[: len(hf_power_reference)] = hf_power_reference
            ds["hf_power_reference"].loc[at] = ref
        ds["completed"].loc[at] = 1
    return ds


def completed_cells(ds: xr.Dataset) -> set[tuple[str, int]]:
    """The (condition, iteration) pairs already final."""
    done = ds["completed"].values
    return {
        (str(c), int(k))
        for i, c in enumerate(ds.condition.values)
        for j, k in enumerate(ds.iteration.values)
        if done[i, j]
    }
