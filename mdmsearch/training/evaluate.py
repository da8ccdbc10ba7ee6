"""Likelihood evaluation: per-example ELBO -> bits per dimension, with a fixed seed."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..diffusion.process import LinearMDM
from ..objectives import bits_per_dim, elbo_terms, preprocess_pixels
from ..objectives.time_sampling import TimeSampler


def prepare_batch(batch: torch.Tensor, levels: int | None, generator: torch.Generator | None):
    """Data -> (model-space x, ldj).  Pixels are dequantized and logit-transformed; continuous
    data pass through with ldj = 0."""
    if levels is None:
        x = batch.to(torch.float32)
        return x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return preprocess_pixels(batch, levels, generator=generator)


@torch.no_grad()
def data_moments(data: torch.Tensor, levels: int | None, generator: torch.Generator | None,
                 batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and variance of ``data`` in model space (dequantized with
    ``generator``, logit-transformed), accumulated in float64 over chunks: ([*shape], [*shape])."""
    total = total_sq = None
    for start in range(0, data.shape[0], batch_size):
        x, _ = prepare_batch(data[start : start + batch_size], levels, generator)
        x = x.to(torch.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = x.pow(2).sum(0) if total_sq is None else total_sq + x.pow(2).sum(0)
    n = data.shape[0]
    mean = total / n
    return mean.cpu(), (total_sq / n - mean.pow(2)).clamp_min(0.0).cpu()


@torch.no_grad()
def evaluate_bpd(
    process: LinearMDM,
    model: Callable,
    data: torch.Tensor,
    levels: int | None,
    *,
    time_sampler: TimeSampler,
    batch_size: int = 256,
    n_t: int = 1,
    seed: int = 12345,
    device: torch.device | str = "cpu",
    return_all: bool = False,
) -> dict:
    """Mean bits per dimension (with the truncation term) and its standard error over ``data``.

    For continuous data the "bpd" is -ELBO / (d ln 2) of the density itself (may be negative).
    ``return_all`` adds the per-example values (for paired comparisons under the same seed).

    Common random numbers: dequantization noise, time strata and the Gaussian noise come from
    three generators seeded from ``seed``, so two models evaluated with the same seed on the
    same examples see the same dequantized data and the same times whatever their number of
    variables (and the same eps when that number is equal): their per-example difference has
    a much smaller variance than either BPD.
    """
    device = torch.device(device)
    deq_gen = torch.Generator(device=device).manual_seed(int(seed))
    time_gen = torch.Generator(device=device).manual_seed(int(seed) + 1)
    noise_gen = torch.Generator(device=device).manual_seed(int(seed) + 2)
    bpds, kls = [], []
    dim = int(data[0].numel())
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size].to(device)
        x, ldj = prepare_batch(batch, levels, deq_gen)
        terms = elbo_terms(process, x, model, time_sampler=time_sampler, n_t=n_t, truncation=True,
                           generator=noise_gen, time_generator=time_gen)
        bpds.append(bits_per_dim(terms.total, ldj, dim, levels).cpu())
        kls.append(process.prior_kl(x).to(torch.float64).cpu())
    bpd = torch.cat(bpds)
    kl = torch.cat(kls)
    return {
        "bpd": float(bpd.mean()),
        "bpd_se": float(bpd.std() / math.sqrt(max(1, bpd.numel() - 1))) if bpd.numel() > 1 else float("nan"),
        "prior_kl_per_dim": float(kl.mean()) / dim,
        "n": int(bpd.numel()),
        **({"per_example": bpd} if return_all else {}),
    }
