"""Using a trained run's model: evaluation (ELBO BPD), PF-ODE likelihood (BPD), sampling.

A run reports the EMA of its network and process parameters as its model: every number
and sample here is computed under :func:`reported_weights` (the EMA swapped in, network in
evaluation mode; the raw weights are back afterwards).  The trainer evaluates and samples
through these functions, and so do the ``evaluate`` and ``sample`` commands, so a command
run on a checkpoint sees the model the run's own metrics describe.

Every function takes a :class:`RunModel`: anything with the run's ``process``, ``net``,
noise predictor ``model``, ``ema`` and ``device`` (a :class:`~mdmsearch.training.Trainer`,
or the :class:`~mdmsearch.training.build.Parts` it was built from).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import torch

from ..diffusion.process import LinearMDM
from ..objectives import bits_per_dim
from ..objectives.time_sampling import AdaptiveTime, TimeSampler
from ..sampling import ode_log_likelihood, sample
from .ema import EMA
from .evaluate import evaluate_bpd, prepare_batch

__all__ = ["RunModel", "reported_weights", "evaluate_model", "ode_evaluate", "draw_samples", "NFE_PER_STEP",
           "QUALITY_CHUNK", "sample_quality"]


class RunModel(Protocol):
    """What the functions here need of a run (a Trainer or its Parts)."""

    process: LinearMDM
    net: torch.nn.Module
    model: Callable  # noise predictor: the network, or the Gaussian part plus the network
    ema: EMA  # of network and process parameters
    device: torch.device


@contextmanager
def reported_weights(run: RunModel) -> Iterator[None]:
    """The weights the run reports as its model: the network in evaluation mode with the EMA of
    network and process parameters swapped in for the duration (the raw ones restored after)."""
    run.net.eval()
    with run.ema.applied():
        yield


def evaluate_model(run: RunModel, data: torch.Tensor, levels: int | None, *, time_sampler: TimeSampler,
                   n_t: int, seed: int, batch_size: int = 256, return_all: bool = True, group=None) -> dict:
    """:func:`~mdmsearch.training.evaluate.evaluate_bpd` of the reported model on ``data``
    [N, *shape]: bpd, bpd_se, prior_kl_per_dim, n (and per_example).  An adaptive time
    sampler is refreshed for the reported process first (its importance weights follow Q, D).
    ``group``: the processes of a data-parallel run, which share the examples (default: one)."""
    with reported_weights(run):
        if isinstance(time_sampler, AdaptiveTime):
            time_sampler.refresh(run.process)
        return evaluate_bpd(run.process, run.model, data, levels, time_sampler=time_sampler, batch_size=batch_size,
                            n_t=n_t, seed=seed, device=run.device, return_all=return_all, group=group)


def ode_evaluate(run: RunModel, data: torch.Tensor, levels: int | None, *, t_min: float, seed: int) -> dict:
    """Bits per dimension of ``data`` [N, *shape] from the probability-flow ODE likelihood of the
    reported model (one batch; dequantization, v_0 and probes from one generator seeded with
    ``seed``): bpd, bpd_se, n and per_example (float64 [N])."""
    data = data.to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(int(seed))
    with reported_weights(run):
        x, ldj = prepare_batch(data, levels, gen)  # model space, [N, *shape]; [N]
        ll = ode_log_likelihood(run.process, run.model, x, t_min=t_min, generator=gen)  # nats, [N]
    bpd = bits_per_dim(ll.detach(), ldj, int(data[0].numel()), levels)  # [N]
    return {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std() / math.sqrt(max(1, bpd.numel() - 1))),
            "n": int(bpd.numel()), "per_example": bpd}


def draw_samples(run: RunModel, n: int, data_shape: tuple[int, ...], *, sampler: str = "em", steps: int,
                 t_min: float, seed: int) -> torch.Tensor:
    """``n`` samples of the reported model in model space, [n, *data_shape]: ``sampler`` (em, ode)
    over ``steps`` steps from T to ``t_min``, all noise from a generator seeded with ``seed``."""
    gen = torch.Generator(device=run.device).manual_seed(int(seed))
    with reported_weights(run):
        return sample(run.process, run.model, n, tuple(data_shape), sampler=sampler, steps=steps, t_min=t_min,
                      generator=gen, device=run.device)


# network evaluations per step of each sampler at its default method (em: one drift; ode: RK4)
NFE_PER_STEP = {"em": 1, "ode": 4}
# samples drawn together for the sample quality: memory is the batch's states and activations, so an
# FID-scale n (10k-50k) is drawn in chunks; chunk i's noise is seeded with seed + i * QUALITY_SEED_STRIDE
# (chunk 0 with the seed itself: an n up to QUALITY_CHUNK draws exactly the samples of one batch)
QUALITY_CHUNK = 1000
QUALITY_SEED_STRIDE = 1_000_003


def sample_quality(run: RunModel, quality, data, *, t_min: float) -> dict:
    """KID and FID of the reported model's samples against the training split (see
    :func:`mdmsearch.quality.score_samples`), drawn at a fixed cost: ``quality.nfe`` network
    evaluations per sample with ``quality.sampler``, from noise seeded with ``quality.seed``, in
    chunks of :data:`QUALITY_CHUNK`; the features are computed on the run's device.
    ``quality``: a :class:`~mdmsearch.config.QualityConfig`; ``data``: the run's DataBundle."""
    from ..quality import score_samples
    from ..sampling.images import to_pixels

    per_step = NFE_PER_STEP[quality.sampler]
    steps = max(1, quality.nfe // per_step)
    pixels = []
    for i, start in enumerate(range(0, quality.n, QUALITY_CHUNK)):
        x = draw_samples(run, min(QUALITY_CHUNK, quality.n - start), data.shape, sampler=quality.sampler, steps=steps,
                         t_min=t_min, seed=quality.seed + i * QUALITY_SEED_STRIDE)  # model space, [chunk, C, H, W]
        pixels.append(to_pixels(x, data.levels).cpu())  # [chunk, C, H, W] integers in 0..levels-1
    scores = score_samples(torch.cat(pixels), data, features=quality.features, seed=quality.seed, device=run.device)
    return {**scores, "sampler": quality.sampler, "nfe": steps * per_step}
