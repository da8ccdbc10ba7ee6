"""Datasets generated in code (no files): a Gaussian with known density and 2-D toys.

Each generator is a pure function of (n, generator); the loaders draw
``n_train + n_val + n_test`` i.i.d. points once and cut them in order, so the
splits are disjoint and fixed by the seed. The toys are scaled to roughly unit
variance per coordinate with constants derived from their construction (so the
distribution itself does not depend on the seed).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdmsearch.data.base import DataBundle, DatasetRequest
from mdmsearch.data.registry import register_dataset

DEFAULT_SIZES = (4096, 1024, 1024)  # train, val, test


def _sizes(request: DatasetRequest) -> tuple[int, int, int]:
    d_train, d_val, d_test = DEFAULT_SIZES
    return (
        request.n_train or d_train,
        request.n_val or d_val,
        request.n_test or d_test,
    )


def _bundle_from_samples(
    name: str, x: torch.Tensor, request: DatasetRequest, meta: dict | None = None
) -> DataBundle:
    """Cut i.i.d. samples ``x`` [n_train + n_val + n_test, *shape] into the three splits."""
    n_train, n_val, n_test = _sizes(request)
    x = x.to(torch.float32).contiguous()
    return DataBundle(
        name=name,
        shape=tuple(x.shape[1:]),
        levels=None,
        train=x[:n_train],
        val=x[n_train : n_train + n_val],
        test=x[n_train + n_val : n_train + n_val + n_test],
        meta=meta or {},
    )


def sample_gaussian(
    n: int, dim: int, mu: float, var: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` draws of N(mu, var * I) in ``dim`` dimensions -> [n, dim] float32."""
    return mu + math.sqrt(var) * torch.randn(n, dim, generator=generator)


def sample_checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """4x4 checkerboard on [-4, 4]^2 (FFJORD's toy), scaled to unit variance -> [n, 2]."""
    x1 = torch.rand(n, generator=generator) * 4 - 2  # [n] in [-2, 2)
    x2 = torch.rand(n, generator=generator) - 2 * torch.randint(0, 2, (n,), generator=generator)
    x2 = x2 + torch.floor(x1) % 2  # pick the occupied square of each column
    x = 2.0 * torch.stack([x1, x2], dim=1)  # [n, 2], both marginals uniform on [-4, 4]
    return x / math.sqrt(16.0 / 3.0)  # var of U(-4, 4) is 16/3


# make_moons: outer arc (cos t, sin t), inner arc (1 - cos t, 0.5 - sin t), t in [0, pi].
# Mixture mean (0.5, 0.25); per-coordinate std about (0.866, 0.494) plus the noise.
_MOONS_MEAN = np.array([0.5, 0.25])
_MOONS_STD = np.array([0.866, 0.494])


def sample_moons(n: int, noise: float, seed: int) -> torch.Tensor:
    """Two interleaving half circles (sklearn ``make_moons``), standardized -> [n, 2]."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=noise, shuffle=True, random_state=seed)
    std = np.sqrt(_MOONS_STD**2 + noise**2)
    return torch.from_numpy((x - _MOONS_MEAN) / std).to(torch.float32)


def sample_8gaussians(n: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Mixture of 8 Gaussians on a circle of radius sqrt(2) (unit-variance centers) -> [n, 2]."""
    angles = torch.arange(8) * (2 * math.pi / 8)  # [8]
    centers = math.sqrt(2.0) * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [8, 2]
    idx = torch.randint(0, 8, (n,), generator=generator)  # [n]
    x = centers[idx] + std * torch.randn(n, 2, generator=generator)  # [n, 2]
    return x / math.sqrt(1.0 + std**2)


@register_dataset("gaussian")
def load_gaussian(
    request: DatasetRequest, *, dim: int = 2, mu: float = 0.1, var: float = 0.25
) -> DataBundle:
    """i.i.d. N(mu, var) per coordinate; ``meta`` carries mu/var/dim for exact likelihoods."""
    if dim < 1 or var <= 0:
        raise ValueError(f"gaussian: need dim >= 1 and var > 0, got dim={dim}, var={var}")
    x = sample_gaussian(sum(_sizes(request)), dim, mu, var, request.generator())
    return _bundle_from_samples(
        "gaussian", x, request, meta={"mu": float(mu), "var": float(var), "dim": int(dim)}
    )


@register_dataset("checkerboard")
def load_checkerboard(request: DatasetRequest) -> DataBundle:
    """2-D checkerboard toy, unit variance per coordinate."""
    return _bundle_from_samples(
        "checkerboard", sample_checkerboard(sum(_sizes(request)), request.generator()), request
    )


@register_dataset("moons")
def load_moons(request: DatasetRequest, *, noise: float = 0.05) -> DataBundle:
    """2-D two-moons toy (sklearn make_moons), standardized."""
    x = sample_moons(sum(_sizes(request)), noise, request.seed)
    return _bundle_from_samples("moons", x, request, meta={"noise": float(noise)})


@register_dataset("8gaussians")
def load_8gaussians(request: DatasetRequest, *, std: float = 0.1) -> DataBundle:
    """2-D mixture of 8 Gaussians on a circle, roughly unit variance."""
    x = sample_8gaussians(sum(_sizes(request)), std, request.generator())
    return _bundle_from_samples("8gaussians", x, request, meta={"std": float(std)})
