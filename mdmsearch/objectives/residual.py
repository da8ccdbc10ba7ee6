"""Gaussian-residual ("mixed") noise prediction for any linear MDM (docs/gaussian-residual.md).

If every data coordinate j were Gaussian, x_j ~ N(mu_j, s2_j), the optimal noise prediction
would be known in closed form for any Q and D.  With the given-x kernel (Phi, Sigma = L L^T)
and u = Phi e_1 (the column of Phi that carries x), z_j = u x_j + L eps_j, so

    C_j   = Sigma + s2_j u u^T                              marginal covariance of z_j
    eps_G = E[eps | z] = L^T C_j^{-1} (z_j - u mu_j)

and with Sherman-Morrison, q = L^{-1} u, a = |q|^2, y = L^{-1}(z_j - u mu_j):

    eps_G = y - q * s2_j (q . y) / (1 + s2_j a)

(L^T Sigma^{-1} = L^{-1}, so no n x n inverse per coordinate is ever formed).  The network
only learns the residual: eps_hat = eps_G + net(z, t).  The statistics mu, s2 are estimated
once from the training split in model space (after dequantization and the logit transform)
and travel with the model (buffers) into checkpoints, evaluation and sampling.

The Gaussian part also has a closed-form expectation over eps inside the denoising loss
(:func:`gaussian_dsm_expectation`), which the ELBO uses as a Rao-Blackwellized estimate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..diffusion.ops import apply_matrix

__all__ = ["RESIDUAL_STATS", "GaussianStats", "GaussianPart", "ResidualEps", "gaussian_part",
           "gaussian_dsm_expectation", "is_kernel_aware", "residual_stats"]

log = logging.getLogger(__name__)

_DT = torch.float64
StatsKind = Literal["pixel", "floored", "global"]
# floored: per-coordinate variances below this fraction of the global variance are raised to
# it (background pixels of MNIST have a variance near zero, which makes eps_G brittle there)
FLOOR_FRACTION = 0.1


def _global_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of all coordinates pooled, from per-coordinate moments."""
    g_mean = float(mean.mean())
    return g_mean, float(var.mean() + (mean - g_mean).pow(2).mean())


def _pixel(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, var


def _floored(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, var.clamp_min(FLOOR_FRACTION * _global_moments(mean, var)[1])


def _global(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g_mean, g_var = _global_moments(mean, var)
    return torch.full_like(mean, g_mean), torch.full_like(var, g_var)


# the choices of data statistics, by name (config: model.residual_stats), from the
# per-coordinate mean and variance of the training split in model space
RESIDUAL_STATS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "pixel": _pixel, "floored": _floored, "global": _global}


def residual_stats(mean: torch.Tensor, var: torch.Tensor, kind: StatsKind = "floored") -> tuple[torch.Tensor, torch.Tensor]:
    """The data model's mu and s2 ([*shape] float64 each) from per-coordinate moments.  Variances
    are floored at 1e-8 so that 1 + s2 a keeps its meaning."""
    if kind not in RESIDUAL_STATS:
        raise ValueError(f"residual_stats must be one of {sorted(RESIDUAL_STATS)}, got {kind!r}")
    mean, var = RESIDUAL_STATS[kind](mean.to(_DT), var.to(_DT))
    return mean, var.clamp_min(1e-8)


class GaussianStats(nn.Module):
    """mu_j and s2_j of the data model, float64 buffers of the data shape."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, kind: str = "floored"):
        super().__init__()
        if mean.shape != var.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and var {tuple(var.shape)} must have one shape")
        self.register_buffer("mean", mean.to(_DT))  # [*shape]
        self.register_buffer("var", var.to(_DT))  # [*shape]
        self.kind = kind

    @classmethod
    def from_data(cls, x: torch.Tensor, kind: StatsKind = "floored") -> "GaussianStats":
        """From model-space data x [N, *shape] held in memory."""
        x = x.to(_DT)
        return cls(*residual_stats(x.mean(dim=0), x.var(dim=0, unbiased=False), kind), kind=kind)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.mean.shape), "mean": self.mean.flatten().tolist(),
                "var": self.var.flatten().tolist()}


@dataclass
class GaussianPart:
    """eps_G and the pieces the ELBO reuses: q = L^{-1} u [B, n] and a = |q|^2 [B], float64."""

    eps: torch.Tensor  # [B, n, *shape], z's dtype
    q: torch.Tensor  # [B, n]
    a: torch.Tensor  # [B]


def gaussian_part(stats: GaussianStats, z: torch.Tensor, phi: torch.Tensor, chol: torch.Tensor) -> GaussianPart:
    """The exact Gaussian noise prediction eps_G for z [B, n, *shape] given the given-x kernel
    Phi, L ([B or 1, n, n], float64)."""
    batch = z.shape[0]
    phi, chol = phi.expand(batch, -1, -1), chol.expand(batch, -1, -1)
    eye = torch.eye(chol.shape[-1], dtype=_DT, device=chol.device).expand_as(chol)
    inv_l = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^{-1}, [B, n, n]
    u = phi[:, :, 0]  # [B, n]  Phi e_1
    q = (inv_l @ u.unsqueeze(-1)).squeeze(-1)  # [B, n]  L^{-1} u
    a = q.pow(2).sum(-1)  # [B]
    mean = stats.mean.to(z.dtype)  # [*shape]
    var = stats.var  # [*shape] float64
    shape_1 = (1,) * mean.dim()
    centred = z - u.to(z.dtype).reshape(batch, -1, *shape_1) * mean  # z - u mu, [B, n, *shape]
    y = apply_matrix(inv_l, centred)  # L^{-1}(z - u mu)
    qz = q.to(z.dtype).reshape(batch, -1, *shape_1)  # [B, n, 1...]
    qy = (qz * y).sum(dim=1)  # [B, *shape]  q . y per coordinate
    shrink = (var / (1.0 + var * a.reshape(batch, *shape_1))).to(z.dtype)  # s2 / (1 + s2 a), [B, *shape]
    eps_g = y - qz * (shrink * qy).unsqueeze(1)  # Sherman-Morrison
    return GaussianPart(eps=eps_g, q=q, a=a)


def gaussian_dsm_expectation(stats: GaussianStats, x: torch.Tensor, part: GaussianPart, r: torch.Tensor) -> torch.Tensor:
    """E_eps |R (eps_G - eps)|^2 given x and t, summed over coordinates, [B] float64.

    eps_G - eps = q [(x - mu) / (1 + s2 a) - s2 (q . eps) / (1 + s2 a)] per coordinate, and
    q . eps ~ N(0, a), so the expectation is |R q|^2 ((x - mu)^2 + s2^2 a) / (1 + s2 a)^2.
    r: R = sqrt(2 beta) G^T L^{-T}, [B, n, n] float64.
    """
    batch = x.shape[0]
    rq2 = (r @ part.q.unsqueeze(-1)).squeeze(-1).pow(2).sum(-1)  # |R q|^2, [B]
    shape_1 = (1,) * stats.mean.dim()
    a = part.a.reshape(batch, *shape_1)
    num = (x.to(_DT) - stats.mean).pow(2) + stats.var.pow(2) * a  # [B, *shape]
    per_coord = num / (1.0 + stats.var * a).pow(2)
    return rq2 * per_coord.reshape(batch, -1).sum(-1)


class ResidualEps(nn.Module):
    """eps_hat(z, t) = eps_G(z, t) + net(z, t): a kernel-aware noise predictor.

    Called as ``model(z, t, kernel)`` with the given-x kernel of t (objects with ``phi`` and
    ``chol``); the ELBO hands over the kernel it already computed.
    """

    kernel_aware = True

    def __init__(self, net: nn.Module, stats: GaussianStats):
        super().__init__()
        self.net = net
        self.stats = stats

    def gaussian(self, z: torch.Tensor, kernel) -> GaussianPart:
        return gaussian_part(self.stats, z, kernel.phi, kernel.chol)

    def forward(self, z: torch.Tensor, t: torch.Tensor, kernel) -> torch.Tensor:
        return self.gaussian(z, kernel).eps + self.net(z, t)


def is_kernel_aware(model) -> bool:
    """Models that take the given-x kernel as a third argument (``model(z, t, kernel)``)."""
    return bool(getattr(model, "kernel_aware", False))
