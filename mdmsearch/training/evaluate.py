"""Likelihood evaluation: per-example ELBO -> bits per dimension, with a fixed seed."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from ..diffusion.process import LinearMDM
from ..objectives import bits_per_dim, elbo_terms, preprocess_pixels
from ..objectives.time_sampling import TimeSampler

if TYPE_CHECKING:
    from .distributed import Group


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
    group: "Group | None" = None,
) -> dict:
    """Mean bits per dimension (with the truncation term) and its standard error over ``data``.

    For continuous data the "bpd" is -ELBO / (d ln 2) of the density itself (may be negative).
    ``return_all`` adds the per-example values (for paired comparisons under the same seed).

    Common random numbers: dequantization noise, time strata and the Gaussian noise come from
    three generators seeded from ``seed``, so two models evaluated with the same seed on the
    same examples see the same dequantized data and the same times whatever their number of
    variables (and the same eps when that number is equal): their per-example difference has
    a much smaller variance than either BPD.

    ``group`` (a data-parallel run's processes, :mod:`~mdmsearch.training.distributed`): each
    process evaluates its rows of every batch, drawing the whole batch's random numbers, and
    every process gets all per-example values: the numbers of one process evaluating alone.
    """
    from .distributed import SOLO

    group = group if group is not None else SOLO
    device = torch.device(device)
    gens = [torch.Generator(device=device).manual_seed(int(seed) + k) for k in range(3)]  # deq, time, noise
    rows = []
    dim = int(data[0].numel())
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size]
        total, mine = batch.shape[0], group.rows(batch.shape[0])
        local = _batch_bpd(process, model, batch[mine].to(device), levels, [group.shard(g, total) for g in gens],
                           time_sampler=time_sampler, n_t=n_t)  # [rows, 2]: bpd, prior KL
        rows.append(group.gather_rows(local, total))
    both = torch.cat(rows)  # [N, 2]
    bpd, kl = both[:, 0].contiguous(), both[:, 1].contiguous()
    return {
        "bpd": float(bpd.mean()),
        "bpd_se": float(bpd.std() / math.sqrt(max(1, bpd.numel() - 1))) if bpd.numel() > 1 else float("nan"),
        "prior_kl_per_dim": float(kl.mean()) / dim,
        "n": int(bpd.numel()),
        **({"per_example": bpd} if return_all else {}),
    }


def _batch_bpd(process: LinearMDM, model: Callable, batch: torch.Tensor, levels: int | None, gens: list, *,
               time_sampler: TimeSampler, n_t: int) -> torch.Tensor:
    """Per-example BPD and prior KL (nats) of ``batch`` [b, *shape] -> [b, 2] float64 on the CPU;
    ``gens``: the dequantization, time and noise generators (or their shards)."""
    if batch.shape[0] == 0:  # (a process without rows: the last batch is smaller than the group)
        return torch.zeros(0, 2, dtype=torch.float64)
    deq_gen, time_gen, noise_gen = gens
    x, ldj = prepare_batch(batch, levels, deq_gen)
    terms = elbo_terms(process, x, model, time_sampler=time_sampler, n_t=n_t, truncation=True,
                       generator=noise_gen, time_generator=time_gen)
    bpd = bits_per_dim(terms.total, ldj, int(batch[0].numel()), levels)  # [b]
    return torch.stack([bpd, process.prior_kl(x).to(torch.float64)], dim=1).cpu()
