"""Writing samples to disk: image grids (torchvision) and 2-D scatter plots (matplotlib Agg)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, *, padding: int = 2, min_size: int = 32
) -> Path:
    """Write float images in [0, 1] of shape [N, C, H, W] (C in {1, 3}) as one PNG grid.

    ``nrow`` (images per row) defaults to ceil(sqrt(N)); values are clamped to [0, 1].
    Images smaller than ``min_size`` pixels are enlarged by an integer factor (nearest
    neighbour, pixels stay sharp) so that 8x8 digits are legible in a report.
    Returns the written path (parent folders are created).
    """
    from torchvision.utils import save_image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"save_image_grid expects a [N, C, H, W] tensor with C in (1, 3), got {shape}")
    if images.shape[0] == 0:
        raise ValueError("save_image_grid: no images to save")
    n = int(images.shape[0])
    nrow = nrow or math.ceil(math.sqrt(n))
    x = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0)  # [N, C, H, W]
    factor = max(1, math.ceil(min_size / max(1, min(x.shape[-2:]))))
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=padding, format="png")
    logger.debug("wrote %d-image grid to %s", n, path)
    return path


def save_scatter(
    points: torch.Tensor | np.ndarray,
    path: str | Path,
    *,
    title: str | None = None,
    lim: float | None = None,
    size: float = 2.0,
) -> Path:
    """Scatter plot of 2-D points [N, 2] to a PNG (Agg canvas, no global pyplot state).

    ``lim`` fixes both axes to [-lim, lim]; by default matplotlib autoscales.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"save_scatter expects points of shape [N, 2], got {pts.shape}")
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=0.5, linewidths=0)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    logger.debug("wrote scatter of %d points to %s", len(pts), path)
    return path
