"""Time embeddings shared by the score networks."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of a batch of (already scaled) times.

    Args:
        t: float tensor of shape [B] (a 0-dim tensor is treated as [1]).  Callers
            scale diffusion time in [0, 1] first, e.g. ``t * 1000``.
        dim: embedding size (odd sizes are zero-padded by one column).
        max_period: the lowest frequency is ``1 / max_period``.

    Returns:
        Tensor of shape [B, dim] (float32 unless ``t`` is float64).
    """
    if dim < 1:
        raise ValueError(f"sinusoidal_embedding: dim must be >= 1, got {dim}")
    t = t.reshape(-1)
    if not t.is_floating_point():
        t = t.float()
    half = dim // 2
    # freqs: [half], geometric from 1 down to ~1/max_period
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype)
    freqs = torch.exp(exponent / max(half - 1, 1))
    # args: [B, half]
    args = t.unsqueeze(-1) * freqs.unsqueeze(0)
    # emb: [B, 2 * half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        # emb: [B, dim]
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def prepare_time(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Return time as a float tensor of shape [batch] on ``device``.

    Accepts a python float, a 0-dim tensor, a tensor with a single element (both
    broadcast to the batch, as ODE solvers pass a scalar time) or a tensor with
    ``batch`` elements (e.g. [B] or [B, 1]).
    """
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    t = t.reshape(-1)
    if t.shape[0] == 1 and batch != 1:
        t = t.expand(batch)
    elif t.shape[0] != batch:
        raise ValueError(f"time has {t.shape[0]} elements, expected 1 or batch size {batch}")
    return t


def check_state_shape(net: str, z: torch.Tensor, n_vars: int, data_shape: tuple[int, ...]) -> None:
    """Raise a clear error unless z is [B, n_vars, *data_shape]."""
    if tuple(z.shape[1:]) != (n_vars, *data_shape):
        raise ValueError(
            f"{net}: expected z of shape [B, {n_vars}, {', '.join(map(str, data_shape))}], got {list(z.shape)}"
        )
