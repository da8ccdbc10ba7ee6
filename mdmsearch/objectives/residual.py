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

from ..diffusion.ops import apply_matrix, inv_lower

__all__ = ["RESIDUAL_STATS", "GaussianStats", "GaussianPart", "ResidualEps", "gaussian_part", "gaussian_direction",
           "gaussian_error", "gaussian_dsm_expectation", "is_kernel_aware", "residual_stats"]

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
    """eps_G with q = L^{-1} u [B, n] and a = |q|^2 [B] (float64) of its kernel."""

    eps: torch.Tensor  # [B, n, *shape], z's dtype
    q: torch.Tensor  # [B, n]
    a: torch.Tensor  # [B]


def gaussian_direction(phi: torch.Tensor, chol: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = L^{-1} u with u = Phi e_1, and a = |q|^2, from the given-x kernel ([B or 1, n, n]
    float64) -> ([B, n], [B]) float64."""
    phi, chol = phi.expand(batch, -1, -1), chol.expand(batch, -1, -1)
    q = torch.linalg.solve_triangular(chol, phi[:, :, 0:1], upper=False).squeeze(-1)  # [B, n]  L^{-1} Phi e_1
    return q, q.pow(2).sum(-1)


def _coord(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, n] -> broadcastable against [B, (n,) *shape] data coordinates."""
    return v.reshape(*v.shape, *([1] * (like.dim() - v.dim())))


def gaussian_part(stats: GaussianStats, z: torch.Tensor, phi: torch.Tensor, chol: torch.Tensor) -> GaussianPart:
    """The exact Gaussian noise prediction eps_G for z [B, n, *shape] given the given-x kernel
    Phi, L ([B or 1, n, n], float64), by Sherman-Morrison per coordinate.

    Where Sigma is nearly singular (small t for processes without noise on x) q is huge and the
    two terms cancel; the ELBO therefore never computes eps_G from z but eps_G - eps from
    (x, eps) with :func:`gaussian_error`, which has no cancellation.
    """
    batch = z.shape[0]
    inv_l = inv_lower(chol.expand(batch, -1, -1))  # L^{-1}, [B, n, n]
    u = phi.expand(batch, -1, -1)[:, :, 0]  # [B, n]  Phi e_1
    q = (inv_l @ u.unsqueeze(-1)).squeeze(-1)  # [B, n]  L^{-1} u
    a = q.pow(2).sum(-1)  # [B]
    x_like = z[:, 0]  # [B, *shape]
    y = apply_matrix(inv_l, z - _coord(u.to(z.dtype), z) * stats.mean.to(z.dtype))  # L^{-1}(z - u mu)
    qz = _coord(q.to(z.dtype), z)  # [B, n, 1...]
    qy = (qz * y).sum(dim=1)  # [B, *shape]  q . y per coordinate
    shrink = (stats.var / (1.0 + stats.var * _coord(a, x_like))).to(z.dtype)  # s2 / (1 + s2 a)
    return GaussianPart(eps=y - qz * (shrink * qy).unsqueeze(1), q=q, a=a)


def gaussian_error(stats: GaussianStats, x: torch.Tensor, eps: torch.Tensor, q: torch.Tensor,
                   a: torch.Tensor) -> torch.Tensor:
    """eps_G - eps for z = u x + L eps, from (x, eps) without forming z:

        eps_G - eps = q [(x - mu) - s2 (q . eps)] / (1 + s2 a)       per coordinate,

    products only (no cancellation at any t).  x [B, *shape], eps [B, n, *shape] -> [B, n, *shape]."""
    denom = (1.0 + stats.var * _coord(a, x)).to(x.dtype)  # [B, *shape]
    qe = _coord(q.to(eps.dtype), eps)  # [B, n, 1...]
    q_eps = (qe * eps).sum(dim=1)  # [B, *shape]
    scalar = ((x - stats.mean.to(x.dtype)) - stats.var.to(x.dtype) * q_eps) / denom  # [B, *shape]
    return qe * scalar.unsqueeze(1)


def gaussian_dsm_expectation(stats: GaussianStats, x: torch.Tensor, q: torch.Tensor, a: torch.Tensor,
                             r: torch.Tensor) -> torch.Tensor:
    """E_eps |R (eps_G - eps)|^2 given x and t, summed over coordinates, [B] float64.

    With q . eps ~ N(0, a) in :func:`gaussian_error`, the expectation is
    |R q|^2 ((x - mu)^2 + s2^2 a) / (1 + s2 a)^2 per coordinate.
    r: R = sqrt(2 beta) G^T L^{-T}, [B, n, n] float64.
    """
    batch = x.shape[0]
    rq2 = torch.bmm(r, q.unsqueeze(-1)).pow(2).sum(dim=(-1, -2))  # |R q|^2, [B]
    a_c = _coord(a, x)
    num = (x.to(_DT) - stats.mean).pow(2) + stats.var.pow(2) * a_c  # [B, *shape]
    per_coord = num / (1.0 + stats.var * a_c).pow(2)
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

    def forward(self, z: torch.Tensor, t: torch.Tensor, kernel) -> torch.Tensor:
        """eps_hat from z alone (samplers, likelihood)."""
        return gaussian_part(self.stats, z, kernel.phi, kernel.chol).eps + self.net(z, t)

    def given_noise(self, z: torch.Tensor, t: torch.Tensor, x: torch.Tensor, e: torch.Tensor, q: torch.Tensor,
                    a: torch.Tensor) -> torch.Tensor:
        """eps_hat at z = u x + L e when x and e are known (the ELBO): the same value as
        ``forward``, computed as e + (eps_G - e) without cancellation."""
        return e + gaussian_error(self.stats, x, e, q, a) + self.net(z, t)


def is_kernel_aware(model) -> bool:
    """Models that take the given-x kernel as a third argument (``model(z, t, kernel)``)."""
    return bool(getattr(model, "kernel_aware", False))
