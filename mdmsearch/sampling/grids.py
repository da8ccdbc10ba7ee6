"""Decreasing time grids T = t_0 > t_1 > ... > t_N = t_min for the reverse-time samplers."""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["GRIDS", "register_grid", "time_grid"]

_DT = torch.float64
GRIDS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {}


def register_grid(name: str):
    """Register ``fn(u, t_min, T) -> t`` mapping u in [1, 0] (decreasing) to times."""

    def deco(fn):
        GRIDS[name] = fn
        return fn

    return deco


@register_grid("uniform")
def _uniform(u: torch.Tensor, t_min: float, T: float) -> torch.Tensor:
    return t_min + (T - t_min) * u


@register_grid("quadratic")
def _quadratic(u: torch.Tensor, t_min: float, T: float) -> torch.Tensor:
    """Steps shrink linearly towards t_min, where the score changes fastest."""
    return t_min + (T - t_min) * u * u


@register_grid("log")
def _log(u: torch.Tensor, t_min: float, T: float) -> torch.Tensor:
    """Geometric spacing: equal steps in log t."""
    return torch.exp(math.log(t_min) + (math.log(T) - math.log(t_min)) * u)


def time_grid(n_steps: int, t_min: float = 1e-3, T: float = 1.0, kind: str = "uniform", *, device=None) -> torch.Tensor:
    """float64 grid [n_steps + 1], strictly decreasing, grid[0] = T and grid[-1] = t_min."""
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; available: {sorted(GRIDS)}")
    n_steps = int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if not 0.0 < t_min < T:
        raise ValueError(f"need 0 < t_min < T, got t_min={t_min}, T={T}")
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=_DT, device=device)  # [N+1] decreasing
    grid = GRIDS[kind](u, float(t_min), float(T))
    grid[0], grid[-1] = T, t_min  # exact end points despite rounding
    return grid
