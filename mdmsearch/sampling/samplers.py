"""Reverse-time samplers for linear MDMs (math note, section 8), k-diffusion style.

Every sampler is a small function with one signature,

    sampler(process, score, z, ts, *, generator=None, callback=None, **options) -> z

z: the state at ts[0] = T, [B, n, *shape];  ts: float64 [N + 1] decreasing to t_min;
score(z, t): the model's score with t [B];  returns the state at ts[-1].  Samplers are
registered by name in ``SAMPLERS``; :func:`sample` draws z_T ~ pi, runs one and returns the
data block x = z[:, 0].

    reverse SDE:   dz = [beta A z - M s] dt + sqrt(2 beta) G dW_bar,  M = 2 beta D, D = G G^T
    prob. flow:    dz/dt = beta A z - 1/2 M s
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..diffusion.ops import apply_matrix, batch_view
from ..diffusion.process import LinearMDM
from .grids import time_grid
from .score import Score, score_fn

__all__ = [
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "available_samplers",
    "euler_maruyama",
    "probability_flow",
    "sample",
    "FIXED_GRID_METHODS",
]

logger = logging.getLogger(__name__)

_DT = torch.float64
Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {}
# torchdiffeq solvers that step exactly on the given grid (the others are adaptive)
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def register_sampler(name: str):
    def deco(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        return fn

    return deco


def available_samplers() -> list[str]:
    return sorted(SAMPLERS)


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {available_samplers()}")
    return SAMPLERS[name]


# ---------------------------------------------------------------------- pieces
def _full_time(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Scalar float64 time -> [B] float64."""
    return t.to(_DT).reshape(1).expand(z.shape[0])


def pf_drift(process: LinearMDM, score: Score, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Probability-flow velocity beta A z - 1/2 M s at times t [B] (float64), [B, n, *shape]."""
    beta = process.schedule.beta(t)  # [B] float64
    half_m = beta[:, None, None] * process.D  # 1/2 M = beta D, [B, n, n]
    return process.drift(z, t) - apply_matrix(half_m, score(z, t))


def reverse_sde_drift(process: LinearMDM, score: Score, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward-time drift of the reverse SDE, beta A z - M s, [B, n, *shape]."""
    beta = process.schedule.beta(t)  # [B]
    m = 2.0 * beta[:, None, None] * process.D  # [B, n, n]
    return process.drift(z, t) - apply_matrix(m, score(z, t))


# ---------------------------------------------------------------------- samplers
@register_sampler("em")
def euler_maruyama(
    process: LinearMDM,
    score: Score,
    z: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    final_noise: bool = False,
) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE from ts[0] down to ts[-1].

    z_{i+1} = z_i - h (beta A z_i - M s(z_i, t_i)) + sqrt(2 beta h) G xi,   h = t_i - t_{i+1}.
    The last step adds no noise (``final_noise=False``): it returns the mean of the last
    Euler–Maruyama transition, so the sample carries no fresh noise of scale sqrt(beta h)
    at t_min.  No extra Tweedie denoising step is taken.
    """
    g = process.D_factor.detach()  # [n, n], D = G G^T
    n_steps = ts.numel() - 1
    for i in range(n_steps):
        t = _full_time(ts[i], z)  # [B]
        h = float(ts[i] - ts[i + 1])
        z_mean = z - h * reverse_sde_drift(process, score, z, t)
        if i < n_steps - 1 or final_noise:
            beta = process.schedule.beta(t)  # [B]
            xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            noise_scale = torch.sqrt(2.0 * beta * h).to(z.dtype)  # [B]
            z = z_mean + batch_view(noise_scale, z) * apply_matrix(g, xi)
        else:
            z = z_mean
        if callback is not None:
            callback(i, ts[i + 1], z)
    return z


@register_sampler("ode")
def probability_flow(
    process: LinearMDM,
    score: Score,
    z: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    method: str = "rk4",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """Probability-flow ODE dz/dt = beta A z - 1/2 M s from ts[0] to ts[-1] (torchdiffeq).

    Fixed-grid methods ("rk4", "euler", "midpoint", ...) step exactly on ``ts``; adaptive
    ones ("dopri5", ...) use (rtol, atol) and still report the state at every grid time.
    ``generator`` is unused (the flow is deterministic).
    """
    from torchdiffeq import odeint

    def velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pf_drift(process, score, y, _full_time(t, y))

    kwargs = {} if method in FIXED_GRID_METHODS else {"rtol": rtol, "atol": atol}
    traj = odeint(velocity, z, ts.to(z.device), method=method, **kwargs)  # [N + 1, B, n, *shape]
    if callback is not None:
        for i in range(1, traj.shape[0]):
            callback(i - 1, ts[i], traj[i])
    return traj[-1]


# ---------------------------------------------------------------------- driver
def sample(
    process: LinearMDM,
    model: Callable,
    n: int,
    data_shape,
    *,
    sampler: str = "em",
    steps: int = 500,
    t_min: float = 1e-3,
    grid: str = "uniform",
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    return_all: bool = False,
    callback: Callable | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Draw ``n`` samples: z_T ~ pi = N(0, S_inf), then run ``sampler`` from T to t_min.

    Returns the data block x = z[:, 0], [n, *data_shape]; with ``return_all=True`` the
    whole final state z [n, n_var, *data_shape] (data and auxiliary variables).
    ``sampler_options`` go to the sampler (e.g. method="dopri5", rtol=1e-5 for "ode";
    final_noise=True for "em").  ``callback(i, t, z)`` sees every intermediate state.
    """
    fn = get_sampler(sampler)
    data_shape = tuple(int(s) for s in (data_shape if hasattr(data_shape, "__iter__") else (data_shape,)))
    device = torch.device(device) if device is not None else process.s_inf.device
    ts = time_grid(steps, t_min, process.T, grid, device=process.s_inf.device)  # [steps + 1] float64
    score = score_fn(process, model, parameterization)
    logger.debug("sampling %d x %s with %s, %d steps on a %s grid to t_min=%g", n, data_shape, sampler, steps, grid, t_min)
    with torch.no_grad():
        z = process.sample_prior(n, data_shape, generator=generator, device=device, dtype=dtype)  # [n, n_var, *shape]
        z = fn(process, score, z, ts, generator=generator, callback=callback, **sampler_options)
    if not bool(torch.isfinite(z).all()):
        logger.warning("sampler %r produced non-finite values (%d entries)", sampler, int((~torch.isfinite(z)).sum()))
    return z if return_all else z[:, 0]
