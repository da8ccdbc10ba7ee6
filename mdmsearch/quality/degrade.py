"""Controlled corruptions of integer pixels, to check that the metrics rank sample quality:
``degrade(pixels [N, C, H, W], levels, strength, gen) -> int64 pixels of the same shape``.

* ``uniform``: a fraction ``strength`` of the pixels replaced by uniform random levels (1: pure noise)
* ``gaussian``: Gaussian noise of std ``strength * (levels - 1)``, rounded and clipped
* ``blur``: Gaussian blur of std ``strength`` pixels (zero padding), rounded
* ``shuffle``: in each image, a random ``strength`` fraction of the pixel positions permuted among
  themselves (all channels alike; 1: every pixel moved at random, the histogram kept)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["DEGRADATIONS", "degrade"]

Degradation = Callable[[torch.Tensor, int, float, torch.Generator], torch.Tensor]


def _uniform(x: torch.Tensor, levels: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randint(0, levels, x.shape, generator=gen)  # [N, C, H, W]
    replace = torch.rand(x.shape, generator=gen) < strength
    return torch.where(replace, noise, x)


def _gaussian(x: torch.Tensor, levels: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)  # [N, C, H, W]
    return torch.round(x + strength * (levels - 1) * eps).clamp(0, levels - 1).to(torch.int64)


def _blur(x: torch.Tensor, levels: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    if strength <= 0:
        return x
    r = max(1, math.ceil(3 * strength))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / strength) ** 2)
    k1 = k1 / k1.sum()  # [2r+1]
    c = x.shape[1]
    y = x.to(torch.float64)
    y = F.conv2d(y, k1.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)  # rows
    y = F.conv2d(y, k1.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)  # columns
    return torch.round(y).clamp(0, levels - 1).to(torch.int64)


def _shuffle(x: torch.Tensor, levels: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).clone()  # [N, C, HW]
    k = round(strength * h * w)
    for i in range(n):
        chosen = torch.randperm(h * w, generator=gen)[:k]  # [k] positions that move
        flat[i][:, chosen] = flat[i][:, chosen[torch.randperm(k, generator=gen)]]
    return flat.reshape(n, c, h, w)


DEGRADATIONS: dict[str, Degradation] = {"uniform": _uniform, "gaussian": _gaussian, "blur": _blur,
                                        "shuffle": _shuffle}


def degrade(pixels: torch.Tensor, levels: int, kind: str, strength: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``pixels`` [N, C, H, W] corrupted by ``DEGRADATIONS[kind]`` at ``strength`` (seeded, pure)."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; available: {', '.join(DEGRADATIONS)}")
    gen = torch.Generator().manual_seed(int(seed))
    return DEGRADATIONS[kind](pixels.to(torch.int64), levels, float(strength), gen)
