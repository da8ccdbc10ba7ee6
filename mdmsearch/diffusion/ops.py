"""Small tensor helpers shared by the process and the objectives.

Every state tensor has shape ``[B, n, *data_shape]``: batch, the n = K + 1 variables
(data + K auxiliaries), then the data coordinates.  The process acts with n x n matrices
along the variable axis, identically on every coordinate (math note, section 1).
"""

from __future__ import annotations

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


_TAYLOR_DEGREE = 14  # ||X||_1 <= 1/2 after scaling: truncation error < 0.5^15 / 15! ~ 2e-17


def _squarings(norm: torch.Tensor) -> torch.Tensor:
    """How many halvings bring a 1-norm below 1/2 (per batch element, int64)."""
    return torch.clamp(torch.ceil(torch.log2(norm.clamp_min(1e-300) / 0.5)), min=0).to(torch.int64)


def _taylor(xs: torch.Tensor) -> torch.Tensor:
    """exp(xs) for ||xs||_1 <= 1/2 by a degree-14 Taylor polynomial (Horner form)."""
    eye = torch.eye(xs.shape[-1], dtype=xs.dtype, device=xs.device).expand_as(xs)
    out = eye
    for k in range(_TAYLOR_DEGREE, 0, -1):  # I + X (I + X/2 (I + X/3 (... (I + X/k))))
        out = eye + (xs @ out) / k
    return out


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
    squarings = _squarings(big_b.abs() * block.abs().sum(dim=0).max())  # [N]
    h = big_b * torch.pow(2.0, -squarings.to(big_b.dtype))  # [N]
    e = _taylor(h[:, None, None] * block)  # [N, 2n, 2n]
    phi, f = e[:, :n, :n], e[:, :n, n:]
    s = f @ phi.transpose(-1, -2)
    s = 0.5 * (s + s.transpose(-1, -2))
    for i in range(int(squarings.max()) if squarings.numel() else 0):
        keep = (squarings > i)[:, None, None]
        s = torch.where(keep, s + phi @ s @ phi.transpose(-1, -2), s)
        phi = torch.where(keep, phi @ phi, phi)
    return phi, s
