"""From samples in model space to pictures: logit-space images and 2-D point clouds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.grid import save_image_grid, save_scatter
from ..objectives.bpd import LOGIT_ALPHA, inverse_logit_transform

__all__ = ["to_images", "to_pixels", "save_samples", "save_sample_figure"]

logger = logging.getLogger(__name__)


def to_pixels(x: torch.Tensor, levels: int, alpha: float = LOGIT_ALPHA) -> torch.Tensor:
    """Logit-space samples [B, C, H, W] -> integer pixels in {0..levels-1} (int64).

    Inverts x = (pixel + U) / L, y = logit(a + (1 - 2a) x): pixel = floor(L * x).
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    u = inverse_logit_transform(x.detach().float(), alpha)  # [B, C, H, W] in [0, 1]
    return torch.floor(u * levels).clamp(0, levels - 1).to(torch.int64)


def to_images(x: torch.Tensor, levels: int, alpha: float = LOGIT_ALPHA) -> torch.Tensor:
    """Logit-space samples -> quantized images in [0, 1] (float32, pixel / (levels - 1)) for grids."""
    return to_pixels(x, levels, alpha).to(torch.float32) / (levels - 1)


def save_samples(x_images: torch.Tensor, path: str | Path, nrow: int | None = None, **kwargs) -> Path:
    """Write samples to a PNG: images [N, C, H, W] in [0, 1] as a grid, points [N, 2] as a scatter.

    Thin dispatch over :func:`mdmsearch.data.grid.save_image_grid` / ``save_scatter``;
    ``kwargs`` go to the chosen writer.
    """
    if x_images.dim() == 4:
        return save_image_grid(x_images, path, nrow=nrow, **kwargs)
    if x_images.dim() == 2 and x_images.shape[1] == 2:
        return save_scatter(x_images, path, **kwargs)
    raise ValueError(f"save_samples expects images [N, C, H, W] or points [N, 2], got {tuple(x_images.shape)}")


def save_sample_figure(x: torch.Tensor, levels: int | None, path: str | Path, *,
                       first_two: bool = False) -> Path | None:
    """Model-space samples as a PNG: images (``levels`` set) as a grid of quantized pixels,
    points [N, 2] as a scatter; other vectors as a scatter of their first two coordinates when
    ``first_two``, else nothing is written (None)."""
    if levels is not None:
        return save_image_grid(to_images(x, levels).cpu(), path)
    points = x.detach().cpu().reshape(x.shape[0], -1)  # [N, d]
    if (x.dim() == 2 and x.shape[1] == 2) or first_two:
        return save_scatter(points[:, :2], path)
    return None
