"""Objectives: the ELBO of any MDM, time sampling, bits per dimension, analytic oracles."""

from .bpd import bits_per_dim, dequantize, inverse_logit_transform, logit_transform, nats_to_bpd, preprocess_pixels
from .elbo import ELBOTerms, diffusion_term_dsm, elbo, elbo_ism, elbo_terms, eps_from_model, truncation_term
from .residual import GaussianStats, ResidualEps, gaussian_part, is_kernel_aware, residual_stats
from .oracle import GaussianOracle, gaussian_log_prob, gaussian_prior_gap
from .time_sampling import (
    TIME_SAMPLERS,
    AdaptiveTime,
    TimeSampler,
    UniformTime,
    VPImportanceTime,
    make_time_sampler,
    register_time_sampler,
    trace_m_sigma_inv,
)

__all__ = [
    "elbo", "elbo_terms", "elbo_ism", "ELBOTerms", "diffusion_term_dsm", "truncation_term", "eps_from_model",
    "bits_per_dim", "dequantize", "logit_transform", "inverse_logit_transform", "nats_to_bpd", "preprocess_pixels",
    "GaussianOracle", "gaussian_log_prob", "gaussian_prior_gap", "TimeSampler", "UniformTime",
    "VPImportanceTime", "AdaptiveTime", "TIME_SAMPLERS", "make_time_sampler", "register_time_sampler",
    "trace_m_sigma_inv", "GaussianStats", "ResidualEps", "gaussian_part", "is_kernel_aware", "residual_stats",
]
