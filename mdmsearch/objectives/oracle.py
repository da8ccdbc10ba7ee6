"""Analytic models for Gaussian data: the exact marginal score is linear (math note, sec. 3).

For x ~ N(mu, s^2) per coordinate, q_t = N(Phi m_bar, C_t) with m_bar = (mu, 0, ..., 0) and
C_t the kernel covariance started from S_0 = diag(s^2, gamma, ..., gamma).  Plugging the
exact score into the ELBO makes it tight up to the prior mismatch, which is the check every
implementation must pass.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.ops import apply_matrix
from ..diffusion.process import LinearMDM

__all__ = ["GaussianOracle", "gaussian_log_prob", "gaussian_prior_gap"]

_DT = torch.float64


class GaussianOracle:
    """score(z, t) = -C_t^{-1} (z - Phi m_bar) for Gaussian data N(mu, var) per coordinate."""

    def __init__(self, process: LinearMDM, mu: float, var: float):
        self.process, self.mu, self.var = process, float(mu), float(var)

    def initial_cov(self) -> torch.Tensor:
        s0 = self.process.initial_cov("x").clone()
        s0[0, 0] = self.var
        return s0

    def moments(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal mean per coordinate [B, n] and covariance [B, n, n] at t [B]."""
        phi, cov = self.process.marginal_covariance(t, self.initial_cov())
        return phi[:, :, 0] * self.mu, cov

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean, cov = self.moments(t.to(_DT))
        prec = torch.linalg.inv(cov)  # [B, n, n]
        centred = z - mean.to(z.dtype).reshape(*mean.shape, *([1] * (z.dim() - 2)))
        return -apply_matrix(prec, centred)


def gaussian_log_prob(x: torch.Tensor, mu: float, var: float) -> torch.Tensor:
    """log N(x; mu, var) summed over coordinates, [B] float64."""
    x = x.to(_DT).reshape(x.shape[0], -1)
    return (-0.5 * (math.log(2 * math.pi * var) + (x - mu) ** 2 / var)).sum(dim=1)


def gaussian_prior_gap(process: LinearMDM, x: torch.Tensor, mu: float, var: float) -> torch.Tensor:
    """E_{q(z_T|x)}[log q_T(z_T) - log pi(z_T)] per example (the oracle ELBO's only gap), [B]."""
    t_end = torch.full((1,), process.T, dtype=_DT)
    phi, sig = process.transition(t_end, given="x")
    oracle = GaussianOracle(process, mu, var)
    mean_q, cov_q = oracle.moments(t_end)
    phi, sig, mean_q, cov_q = phi[0], sig[0], mean_q[0], cov_q[0]
    s_inf = torch.diag(process.s_inf)
    n = process.n

    def expected_log_normal(mean_z, cov_z, m, c):
        # E_{N(mean_z, cov_z)} log N(z; m, c) per coordinate
        ci = torch.linalg.inv(c)
        diff = mean_z - m
        quad = torch.trace(ci @ cov_z) + torch.einsum("...i,ij,...j->...", diff, ci, diff)
        return -0.5 * (n * math.log(2 * math.pi) + torch.logdet(c) + quad)

    xs = x.to(_DT).reshape(x.shape[0], -1, 1)  # [B, d, 1]
    m_t = xs * phi[:, 0]  # [B, d, n] conditional mean per coordinate
    gap = expected_log_normal(m_t, sig, mean_q, cov_q) - expected_log_normal(m_t, sig, torch.zeros(n, dtype=_DT), s_inf)
    return gap.sum(dim=1)
