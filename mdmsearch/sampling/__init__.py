"""Sampling (reverse SDE, probability-flow ODE) and exact likelihoods for linear MDMs."""

from .grids import GRIDS, register_grid, time_grid
from .images import save_sample_figure, save_samples, to_images, to_pixels
from .likelihood import EXACT_TRACE_MAX_DIM, divergence_exact, divergence_hutchinson, ode_log_likelihood
from .samplers import (
    FIXED_GRID_METHODS,
    SAMPLERS,
    available_samplers,
    euler_maruyama,
    get_sampler,
    pf_drift,
    probability_flow,
    register_sampler,
    reverse_sde_drift,
    sample,
)
from .score import PARAMETERIZATIONS, inv_chol_t, score_fn

__all__ = [
    "sample", "SAMPLERS", "register_sampler", "get_sampler", "available_samplers", "euler_maruyama",
    "probability_flow", "pf_drift", "reverse_sde_drift", "FIXED_GRID_METHODS", "time_grid", "GRIDS",
    "register_grid", "score_fn", "inv_chol_t", "PARAMETERIZATIONS", "ode_log_likelihood",
    "divergence_exact", "divergence_hutchinson", "EXACT_TRACE_MAX_DIM", "to_images", "to_pixels",
    "save_samples", "save_sample_figure",
]
