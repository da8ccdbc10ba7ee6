"""Distributions p(t) on [t_min, T] for the Monte Carlo time integral (math note, section 5).

Every sampler returns ``(t, weight)`` with weight = 1 / p(t), both float64 [B], and draws
by inverse CDF (closed form or a table built once), never by per-batch bisection.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..diffusion import draws
from ..diffusion.process import LinearMDM

__all__ = [
    "TimeSampler",
    "UniformTime",
    "VPImportanceTime",
    "AdaptiveTime",
    "TIME_SAMPLERS",
    "register_time_sampler",
    "make_time_sampler",
]

_DT = torch.float64
TIME_SAMPLERS: dict[str, Callable[..., "TimeSampler"]] = {}


def register_time_sampler(name: str):
    def deco(cls):
        TIME_SAMPLERS[name] = cls
        return cls

    return deco


class TimeSampler(ABC):
    name = "base"

    def __init__(self, process: LinearMDM, t_min: float = 1e-3):
        if not 0 < t_min < process.T:
            raise ValueError(f"t_min must be in (0, T={process.T}), got {t_min}")
        self.t_min = float(t_min)
        self.T = process.T

    @abstractmethod
    def sample(self, batch: int, *, generator=None, device=None, stratum=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, 1 / p(t)), float64 [batch] each.

        ``stratum=(i, n)`` draws the uniform behind t from [i/n, (i+1)/n): averaging the n
        strata's weighted integrands is still unbiased and far less noisy than n
        independent draws (stratified sampling of the time integral).
        """

    def refresh(self, process: LinearMDM) -> None:
        """Rebuild any table from the current Q, D (no-op for fixed densities)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep to sample identically after a resume (nothing for a
        fixed density)."""
        return {}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore :meth:`state_dict` (tensors moved to ``device``)."""

    def _uniform(self, batch, generator, device, stratum=None) -> torch.Tensor:
        u = draws.rand(batch, generator, dtype=_DT, device=device)
        if stratum is not None:
            i, n = stratum
            if not 0 <= i < n:
                raise ValueError(f"stratum must be (i, n) with 0 <= i < n, got {stratum}")
            u = (i + u) / n
        return u


@register_time_sampler("uniform")
class UniformTime(TimeSampler):
    """p(t) = 1 / (T - t_min)."""

    def sample(self, batch, *, generator=None, device=None, stratum=None):
        u = self._uniform(batch, generator, device, stratum)
        t = self.t_min + (self.T - self.t_min) * u
        return t, torch.full_like(t, self.T - self.t_min)


@register_time_sampler("vp")
class VPImportanceTime(TimeSampler):
    """p(t) ∝ beta(t) / (1 - exp(-B(t))) (Song et al. 2021); CDF ∝ log(e^{B(t)} - 1)."""

    def __init__(self, process: LinearMDM, t_min: float = 1e-3):
        super().__init__(process, t_min)
        self.schedule = process.schedule
        b = self.schedule.integral(torch.tensor([self.t_min, self.T], dtype=_DT))
        self._lo, self._hi = (float(_log_expm1(v)) for v in b)

    def sample(self, batch, *, generator=None, device=None, stratum=None):
        u = self._uniform(batch, generator, device, stratum)
        c = self._lo + (self._hi - self._lo) * u  # c = log(e^B - 1)
        big_b = torch.nn.functional.softplus(c)  # B = log(1 + e^c)
        t = self.schedule.inverse_integral(big_b).clamp(self.t_min, self.T)
        density = self.schedule.beta(t) / (-torch.expm1(-self.schedule.integral(t))) / (self._hi - self._lo)
        return t, 1.0 / density


@register_time_sampler("adaptive")
class AdaptiveTime(TimeSampler):
    """p(t) ∝ tr(M(t) Sigma_t^{-1}) for the current process, piecewise constant on a
    geometric grid (exact sampling of that density, so the estimator stays unbiased)."""

    def __init__(self, process: LinearMDM, t_min: float = 1e-3, grid_size: int = 512):
        super().__init__(process, t_min)
        self.grid_size = int(grid_size)
        self.refresh(process)

    @torch.no_grad()
    def refresh(self, process: LinearMDM) -> None:
        edges = torch.logspace(math.log10(self.t_min), math.log10(self.T), self.grid_size + 1, dtype=_DT)
        edges = edges.to(process.s_inf.device)
        mids = torch.sqrt(edges[1:] * edges[:-1])  # [G] geometric cell centres
        dens = trace_m_sigma_inv(process, torch.cat([edges, mids]))
        f_edges, f_mids = dens[: edges.numel()], dens[edges.numel():]
        width = edges[1:] - edges[:-1]
        # Simpson's rule per cell for the cell mass
        mass = width * (f_edges[:-1] + 4 * f_mids + f_edges[1:]) / 6.0
        mass = mass.clamp_min(1e-300)
        self.edges, self.width = edges, width
        self.prob = mass / mass.sum()  # [G]
        self.cum = torch.cumsum(self.prob, 0)

    _STATE = ("prob", "cum", "edges", "width")

    def state_dict(self) -> dict:
        """The density table of the last refresh (a resumed run samples from the same one)."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict, device=None) -> None:
        for k in self._STATE:
            setattr(self, k, state[k].to(device) if device is not None else state[k])

    def sample(self, batch, *, generator=None, device=None, stratum=None):
        u = self._uniform(batch, generator, self.prob.device, stratum)  # picks the cell
        idx = torch.searchsorted(self.cum, u * self.cum[-1]).clamp(max=self.grid_size - 1)
        v = self._uniform(batch, generator, self.prob.device)
        t = self.edges[idx] + v * self.width[idx]
        density = self.prob[idx] / self.width[idx]
        w = 1.0 / density
        if device is not None:
            t, w = t.to(device), w.to(device)
        return t, w


def trace_m_sigma_inv(process: LinearMDM, t: torch.Tensor) -> torch.Tensor:
    """tr(M(t) Sigma_t^{-1}) = 2 beta(t) ||L_t^{-1} G||_F^2 given x, [B] float64."""
    kern = process.kernel(t, given="x")
    g = process.D_factor.expand(kern.chol.shape[0], -1, -1)
    sol = torch.linalg.solve_triangular(kern.chol, g, upper=False)  # L^{-1} G
    return 2.0 * kern.beta * sol.pow(2).sum(dim=(-1, -2))


def _log_expm1(b: torch.Tensor) -> torch.Tensor:
    """log(e^b - 1), stable for small and large b."""
    return torch.where(b > 20, b + torch.log1p(-torch.exp(-b)), torch.log(torch.expm1(b)))


def make_time_sampler(name: str, process: LinearMDM, t_min: float = 1e-3, **kwargs) -> TimeSampler:
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; available: {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](process, t_min=t_min, **kwargs)
