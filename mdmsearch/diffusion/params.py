"""Parameterizations that keep Q skew-symmetric and D positive semi-definite by construction.

* Q = U - U^T, U strictly upper-triangular free entries (masked)          (math note, sec. 1)
* D = L L^T,   L lower-triangular free entries (masked)      ("full" D)
* D = diag(softplus(d)) on the masked diagonal                ("diag" D)
* fixed matrices (presets) are buffers.

Masks are boolean buffers: they are part of the *structure* (hashable, saved with the
state dict), the free values are float64 ``nn.Parameter``s.  Every module returns its
matrix from ``forward()``; D-modules also return a factor G with D = G G^T, which the
SDE diffusion term and the M-weighted norms use.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "FixedSkew",
    "FixedPSD",
    "SkewParam",
    "CholeskyPSD",
    "DiagPSD",
    "psd_sqrt",
    "mask_to_tuple",
]

_DT = torch.float64


def mask_to_tuple(mask: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Boolean matrix -> nested tuple of 0/1 (hashable, JSON-friendly)."""
    return tuple(tuple(int(v) for v in row) for row in mask.to(torch.int64).tolist())


def psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix via eigh (negative rounding clipped to 0)."""
    evals, evecs = torch.linalg.eigh(mat.to(_DT))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class FixedSkew(nn.Module):
    """A fixed skew-symmetric Q (presets)."""

    learnable = False

    def __init__(self, q: torch.Tensor):
        super().__init__()
        q = torch.as_tensor(q, dtype=_DT)
        if not torch.allclose(q, -q.T, atol=1e-12):
            raise ValueError(f"Q must be skew-symmetric, got {q.tolist()}")
        self.register_buffer("value", q)

    def forward(self) -> torch.Tensor:
        return self.value

    @property
    def mask(self) -> torch.Tensor:
        return torch.triu(self.value != 0, diagonal=1)


class FixedPSD(nn.Module):
    """A fixed PSD D with its symmetric square root precomputed (presets)."""

    learnable = False

    def __init__(self, d: torch.Tensor):
        super().__init__()
        d = torch.as_tensor(d, dtype=_DT)
        if not torch.allclose(d, d.T, atol=1e-12) or torch.linalg.eigvalsh(d).min() < -1e-12:
            raise ValueError(f"D must be symmetric positive semi-definite, got {d.tolist()}")
        self.register_buffer("value", d)
        self.register_buffer("sqrt", psd_sqrt(d))

    def forward(self) -> torch.Tensor:
        return self.value

    def factor(self) -> torch.Tensor:
        return self.sqrt

    @property
    def mask(self) -> torch.Tensor:
        return torch.tril(self.value != 0)


class SkewParam(nn.Module):
    """Q = U - U^T with U strictly upper-triangular and masked: skew-symmetric exactly."""

    learnable = True

    def __init__(self, n: int, mask: torch.Tensor | None = None, init: torch.Tensor | float = -1.0):
        super().__init__()
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        if mask is None:
            mask = upper
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (n, n):
            raise ValueError(f"Q mask must be {n}x{n}, got {tuple(mask.shape)}")
        # A symmetric or lower mask means the same entry pair; keep the strict upper part.
        mask = torch.triu(mask | mask.T, diagonal=1)
        self.register_buffer("mask", mask)
        init_t = torch.as_tensor(init, dtype=_DT).expand(n, n).clone()
        self.u = nn.Parameter(init_t * mask)

    def forward(self) -> torch.Tensor:
        u = self.u * self.mask  # [n, n], masked entries exactly 0 and without gradient
        return u - u.T


class CholeskyPSD(nn.Module):
    """D = L L^T with L lower-triangular and masked: PSD exactly, any sparsity of L."""

    learnable = True

    def __init__(self, n: int, mask: torch.Tensor | None = None, init: torch.Tensor | float = 1.0):
        super().__init__()
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if mask is None:
            mask = lower
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (n, n):
            raise ValueError(f"D mask must be {n}x{n}, got {tuple(mask.shape)}")
        mask = torch.tril(mask | mask.T)
        self.register_buffer("mask", mask)
        init_t = torch.as_tensor(init, dtype=_DT)
        if init_t.dim() < 2:  # scalar: L = sqrt(init) on the masked diagonal
            init_t = torch.eye(n, dtype=_DT) * init_t.clamp_min(0).sqrt()
        self.l = nn.Parameter(init_t.clone() * mask)

    def factor(self) -> torch.Tensor:
        return self.l * self.mask  # [n, n] lower-triangular G with D = G G^T

    def forward(self) -> torch.Tensor:
        g = self.factor()
        return g @ g.T


class DiagPSD(nn.Module):
    """D = diag(softplus(d)) on the masked diagonal entries, 0 elsewhere."""

    learnable = True

    def __init__(self, n: int, mask: torch.Tensor | None = None, init: torch.Tensor | float = 1.0):
        super().__init__()
        if mask is None:
            mask = torch.eye(n, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() == 1:
            mask = torch.diag(mask)
        if mask.shape != (n, n):
            raise ValueError(f"D mask must be {n}x{n} or length {n}, got {tuple(mask.shape)}")
        mask = torch.diag(torch.diagonal(mask))
        self.register_buffer("mask", mask)
        init_t = torch.as_tensor(init, dtype=_DT).expand(n).clone().clamp_min(1e-6)
        self.d = nn.Parameter(_inverse_softplus(init_t))

    def _diag(self) -> torch.Tensor:
        return nn.functional.softplus(self.d) * torch.diagonal(self.mask)  # [n]

    def factor(self) -> torch.Tensor:
        # sqrt before masking: d/dx sqrt(x) at x = 0 would be inf for masked entries
        return torch.diag(nn.functional.softplus(self.d).sqrt() * torch.diagonal(self.mask))

    def forward(self) -> torch.Tensor:
        return torch.diag(self._diag())
