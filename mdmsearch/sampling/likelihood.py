"""Exact log-likelihood through the probability-flow ODE (math note, section 8).

The flow dz/dt = f(z, t) = beta A z - 1/2 M s(z, t) maps the model's marginals into each
other, and its instantaneous change of variables gives

    log p_0(z_0) = log pi(z_T) + int_0^T div f(z_t, t) dt,      div f = beta tr(A) d - 1/2 div(M s).

The drift part of the divergence is exact; div(M s) is an exact trace (autograd, one
backward pass per state dimension, for small n*d) or a Hutchinson estimate with Rademacher
probes drawn once per integration (unbiased for the whole integral).  For an MDM the data
bound draws v_0 ~ q(v_0 | x) = N(0, gamma I) and returns

    log p(x, v_0) - log q(v_0 | x),   an unbiased one-sample estimate of a lower bound on log p(x).

For K = 0 (no auxiliary variables) q is trivial and the result is log p(x) itself.

Approximation at t_min > 0: the integration starts at t_min with z_{t_min} := z_0, i.e.
it returns log p_{t_min}(z_0), the density of the model's marginal at time t_min, not of
its t -> 0 limit.  For small t_min the difference is O(t_min); t_min = 0 needs a score that
is finite at t = 0 (an eps model is not: L_0 is singular in the x block).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..diffusion.ops import apply_matrix, sum_except_batch
from ..diffusion.process import LinearMDM
from .score import Score, score_fn

__all__ = ["ode_log_likelihood", "EXACT_TRACE_MAX_DIM", "divergence_exact", "divergence_hutchinson"]

logger = logging.getLogger(__name__)

_DT = torch.float64
EXACT_TRACE_MAX_DIM = 64  # exact Jacobian trace by default when n * d <= this


def _grad(scalar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d scalar / d z, zeros where scalar does not depend on z (e.g. a constant model)."""
    if not scalar.requires_grad:
        return torch.zeros_like(z)
    (grad,) = torch.autograd.grad(scalar, z, retain_graph=True, allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad


def divergence_exact(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_i d out_i / d z_i per example, one backward pass per state dimension, [B].

    out, z: [B, n, *shape]; out must depend on each example's own z only.
    """
    flat = out.reshape(out.shape[0], -1)  # [B, N]
    div = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
    for i in range(flat.shape[1]):
        grad = _grad(flat[:, i].sum(), z)  # [B, n, *shape]
        div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(out: torch.Tensor, z: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate mean_k e_k^T (d out / d z) e_k, probes [K, B, n, *shape] -> [B]."""
    total = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
    for k in range(probes.shape[0]):
        vjp = _grad((out * probes[k]).sum(), z)  # e^T J, [B, n, *shape]
        total = total + sum_except_batch(vjp * probes[k])
    return total / probes.shape[0]


def _log_q_v0(v0: torch.Tensor, gamma: float) -> torch.Tensor:
    """log N(v0; 0, gamma I) summed per example, [B] float64 (0 when K = 0)."""
    if v0.shape[1] == 0:
        return torch.zeros(v0.shape[0], dtype=_DT, device=v0.device)
    v = v0.to(_DT).reshape(v0.shape[0], -1)
    return (-0.5 * (math.log(2 * math.pi * gamma) + v * v / gamma)).sum(dim=1)


def _flow_with_divergence(process: LinearMDM, score: Score, d: int, probes: torch.Tensor | None) -> Callable:
    """ODE right-hand side of the augmented state (z [B, n, *shape], acc [B]): (f, div f)."""

    def rhs(t: torch.Tensor, state):
        z, _ = state
        tt = t.to(_DT).reshape(1).expand(z.shape[0])  # [B]
        beta = process.schedule.beta(tt)  # [B] float64
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            half_ms = apply_matrix(beta[:, None, None] * process.D.detach(), score(zr, tt))  # 1/2 M s
            div_ms = divergence_exact(half_ms, zr) if probes is None else divergence_hutchinson(half_ms, zr, probes)
        velocity = process.drift(z, tt) - half_ms.detach()
        div = process.div_drift(tt, d).to(z.dtype) - div_ms.detach()  # [B]
        return velocity, div

    return rhs


def ode_log_likelihood(
    process: LinearMDM,
    model: Callable,
    x: torch.Tensor,
    *,
    parameterization: str = "eps",
    t_min: float = 1e-3,
    exact_trace: bool | None = None,
    n_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-example log p(x, v_0) - log q(v_0 | x) by the probability-flow ODE, float64 [B] (nats).

    x: [B, *shape] (the ODE state has x's dtype; pass float64 for tight tolerances).
    v_0 ~ q(v_0 | x) is drawn first from ``generator``, then (Hutchinson only) the
    Rademacher probes, fixed for the whole integration.  ``exact_trace=None`` picks the
    exact trace when n * d <= 64.  Integrates the augmented ODE from t_min to T with
    torchdiffeq (``method``, ``rtol``, ``atol``); see the module note on t_min > 0.
    The model must treat examples independently (no batch statistics).
    """
    from torchdiffeq import odeint

    if not 0.0 <= t_min < process.T:
        raise ValueError(f"need 0 <= t_min < T, got t_min={t_min}, T={process.T}")
    d = x[0].numel()
    v0 = process.sample_v0(x, generator)  # [B, K, *shape]
    z0 = process.embed(x, v0)  # [B, n, *shape]
    exact = (process.n * d <= EXACT_TRACE_MAX_DIM) if exact_trace is None else bool(exact_trace)
    probes = None
    if not exact:
        shape = (int(n_probes), *z0.shape)
        probes = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    score = score_fn(process, model, parameterization)
    rhs = _flow_with_divergence(process, score, d, probes)
    ts = torch.tensor([t_min, process.T], dtype=_DT, device=x.device)
    acc0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        z_traj, acc_traj = odeint(rhs, (z0, acc0), ts, method=method, rtol=rtol, atol=atol)
    z_end, int_div = z_traj[-1], acc_traj[-1]  # [B, n, *shape], [B]
    log_p = process.prior_log_prob(z_end).to(_DT) + int_div.to(_DT)  # log p(x, v0)
    logger.debug("ode_log_likelihood: %s trace, mean log p(x, v0) = %.4f", "exact" if exact else "Hutchinson", float(log_p.mean()))
    return log_p - _log_q_v0(v0, process.gamma)
