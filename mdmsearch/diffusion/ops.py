"""Small tensor helpers shared by the process and the objectives.

Every state tensor has shape ``[B, n, *data_shape]``: batch, the n = K + 1 variables
(data + K auxiliaries), then the data coordinates.  The process acts with n x n matrices
along the variable axis, identically on every coordinate (math note, section 1).
"""

from __future__ import annotations

import math

import torch

__all__ = ["apply_matrix", "batch_view", "expm", "inv_lower", "phi_and_noise_cov", "sum_except_batch"]


def apply_matrix(mat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Apply n x n matrices along the variable axis.

    mat: [n, n] or [B, n, n]; z: [B, n, *data_shape]  ->  [B, n, *data_shape].
    The matrix is cast to z's dtype/device (matrices live in float64, data in float32).
    """
    mat = mat.to(dtype=z.dtype, device=z.device)
    flat = z.reshape(z.shape[0], z.shape[1], -1)  # [B, n, d]
    if mat.dim() == 2:
        out = torch.einsum("ij,bjd->bid", mat, flat)
    else:
        out = torch.bmm(mat, flat)  # [B, n, n] @ [B, n, d]
    return out.reshape(z.shape)


def batch_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example tensor [B] so it broadcasts against ``like`` [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def inv_lower(chol: torch.Tensor) -> torch.Tensor:
    """L^{-1} of lower-triangular factors [..., n, n] (a triangular solve, no general inverse)."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


# Taylor core of degree 24 on ||X||_1 <= 2 after scaling: truncation error < 2^25 / 25! ~ 2e-18
# (two fewer squarings than a radius of 1/2; each squaring costs three batched products)
_THETA = 2.0
_PS_BLOCK = 5  # Paterson-Stockmeyer block size s: powers X^0..X^4, Horner steps in X^5
_PS_BLOCKS = 5  # degree = s * blocks - 1 = 24
_PS_COEF = [[1.0 / math.factorial(_PS_BLOCK * j + i) for i in range(_PS_BLOCK)] for j in range(_PS_BLOCKS)]


def _squarings(norm: torch.Tensor) -> torch.Tensor:
    """How many halvings bring a 1-norm below the Taylor radius (per batch element, int64)."""
    return torch.clamp(torch.ceil(torch.log2(norm.clamp_min(1e-300) / _THETA)), min=0).to(torch.int64)


def _taylor(xs: torch.Tensor) -> torch.Tensor:
    """exp(xs) for ||xs||_1 <= 2 by the degree-24 Taylor polynomial sum_k X^k / k!.

    Paterson-Stockmeyer evaluation: with P_j = sum_{i<5} X^i / (5j + i)! (one contraction
    over the stacked powers I, X, ..., X^4),  p(X) = P_0 + X^5 (P_1 + X^5 (... + X^5 P_4)).
    Eight matrix products instead of Horner's twenty-four, the same polynomial, so it keeps
    the relative precision of entries that are structurally tiny at small t.
    """
    shape, m = xs.shape, xs.shape[-1]
    xs = xs.reshape(-1, m, m)  # [N, m, m]: batched products as plain bmm
    eye = torch.eye(m, dtype=xs.dtype, device=xs.device).expand_as(xs)
    x2 = torch.bmm(xs, xs)
    x4 = torch.bmm(x2, x2)
    powers = torch.stack([eye, xs, x2, torch.bmm(x2, xs), x4])  # [s, N, m, m]
    x5 = torch.bmm(x4, xs)
    coef = torch.tensor(_PS_COEF, dtype=xs.dtype, device=xs.device)  # [blocks, s]
    blocks = torch.tensordot(coef, powers, dims=1)  # [blocks, N, m, m]
    out = blocks[-1]
    for j in range(_PS_BLOCKS - 2, -1, -1):
        out = torch.baddbmm(blocks[j], x5, out)  # P_j + X^5 out
    return out.reshape(shape)


def expm(x: torch.Tensor) -> torch.Tensor:
    """Matrix exponential of a batch [..., m, m] by scaling and squaring with a Taylor core.

    Unlike a Pade scheme whose degree drops for small norms, the fixed-degree Taylor core
    keeps *relative* precision in entries that are structurally tiny at small t (e.g. the
    x-variance of ALDA given (x, v0), which is O(B^5)).  Built from matmuls only, so it
    is differentiable and batched.  Use float64.
    """
    squarings = _squarings(x.abs().sum(dim=-2).amax(dim=-1))  # [...]
    out = _taylor(x * torch.pow(2.0, -squarings.to(x.dtype))[..., None, None])
    for i in range(int(squarings.max()) if squarings.numel() else 0):
        out = torch.where((squarings > i)[..., None, None], out @ out, out)
    return out


def phi_and_noise_cov(a: torch.Tensor, d: torch.Tensor, big_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi = exp(B A) and S = int_0^B e^{uA} 2D e^{uA^T} du for B [N] (math note, sec. 2).

    Van Loan on a step h = B / 2^s small enough for the Taylor core,
        exp(h [[A, 2D], [0, -A^T]]) = [[Phi_h, F], [0, .]],  S_h = F Phi_h^T,
    then s doublings  S(2h) = S(h) + Phi(h) S(h) Phi(h)^T,  Phi(2h) = Phi(h)^2.
    Squaring the whole 2n x 2n block instead would carry exp(-B A^T), which grows like
    e^{B |Re lambda|} and destroys S for large B; every doubling here adds PSD terms, so
    no precision is lost at any t.  Returns ([N, n, n], [N, n, n]).
    """
    n = a.shape[-1]
    block = torch.cat([torch.cat([a, 2.0 * d], dim=1), torch.cat([torch.zeros_like(a), -a.T], dim=1)], dim=0)
    # one squaring count for the batch, set by its largest B: smaller steps only make the
    # Taylor core more accurate, and a shared count needs no per-element select in the loop
    squarings = int(_squarings(big_b.abs().max() * block.abs().sum(dim=0).max())) if big_b.numel() else 0
    h = big_b * 2.0**-squarings  # [N]
    e = _taylor(h[:, None, None] * block)  # [N, 2n, 2n]
    phi, f = e[:, :n, :n], e[:, :n, n:]
    s = torch.bmm(f, phi.transpose(-1, -2))
    s = 0.5 * (s + s.transpose(-1, -2))
    for _ in range(squarings):  # S(2h) = S(h) + Phi(h) S(h) Phi(h)^T,  Phi(2h) = Phi(h)^2
        s = s + torch.bmm(torch.bmm(phi, s), phi.transpose(-1, -2))
        phi = torch.bmm(phi, phi)
    return phi, s
