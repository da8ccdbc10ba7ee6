"""Dequantization, the logit transform and bits per dimension (math note, section 4).

    x = (pixel + U(0, 1)) / L,   y = logit(a + (1 - 2a) x),   a = 0.05
    bpd = -(ELBO(y) + ldj) / (d ln 2) + log2(L),   ldj = log|det dy/dx|
"""

from __future__ import annotations

import math

import torch

from ..diffusion import draws
from ..diffusion.ops import sum_except_batch

__all__ = ["dequantize", "logit_transform", "inverse_logit_transform", "bits_per_dim", "nats_to_bpd", "preprocess_pixels"]

LOGIT_ALPHA = 0.05


def dequantize(pixels: torch.Tensor, levels: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer pixels in {0..levels-1} -> x in (0, 1) with uniform noise, float32."""
    u = draws.rand(pixels.shape, generator, device=pixels.device)
    return (pixels.to(torch.float32) + u) / levels


def logit_transform(x: torch.Tensor, alpha: float = LOGIT_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """y = logit(alpha + (1 - 2 alpha) x) and ldj = sum log|dy/dx| per example, [B]."""
    p = alpha + (1 - 2 * alpha) * x
    y = torch.log(p) - torch.log1p(-p)
    # dy/dx = (1 - 2 alpha) / (p (1 - p))
    ldj = sum_except_batch(math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p))
    return y, ldj.to(torch.float64)


def inverse_logit_transform(y: torch.Tensor, alpha: float = LOGIT_ALPHA) -> torch.Tensor:
    """y -> x in [0, 1] (clamped), the inverse used on samples."""
    return ((torch.sigmoid(y) - alpha) / (1 - 2 * alpha)).clamp(0.0, 1.0)


def preprocess_pixels(pixels: torch.Tensor, levels: int, *, generator=None, alpha: float = LOGIT_ALPHA):
    """Pixels -> (y, ldj): dequantize then logit-transform."""
    return logit_transform(dequantize(pixels, levels, generator=generator), alpha)


def bits_per_dim(elbo_y: torch.Tensor, ldj: torch.Tensor, dim: int, levels: int | None) -> torch.Tensor:
    """Per-example bits per dimension of the discrete data from the ELBO of y (nats).

    For continuous data (``levels=None``, no transform) pass ldj = 0: bpd = -ELBO / (d ln 2).
    """
    bpd = -(elbo_y.to(torch.float64) + ldj.to(torch.float64)) / (dim * math.log(2))
    if levels is not None:
        bpd = bpd + math.log2(levels)
    return bpd


def nats_to_bpd(nats_per_example: torch.Tensor, dim: int) -> torch.Tensor:
    return nats_per_example / (dim * math.log(2))
