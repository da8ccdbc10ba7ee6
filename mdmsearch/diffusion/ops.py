"""Small tensor helpers shared by the process and the objectives.

Every state tensor has shape ``[B, n, *data_shape]``: batch, the n = K + 1 variables
(data + K auxiliaries), then the data coordinates.  The process acts with n x n matrices
along the variable axis, identically on every coordinate (math note, section 1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

__all__ = ["apply_matrix", "batch_view", "expm", "inv_lower", "phi_and_noise_cov", "sum_except_batch", "HostPlan",
           "host_plan", "planned", "squarings_for", "van_loan_norm"]


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
    coef = _constant("ps_coef", xs.dtype, xs.device)  # [blocks, s]
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


def _van_loan_block(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """M = [[A, 2D], [0, -A^T]], [2n, 2n]: exp(B M) carries Phi = exp(B A) and the noise integral."""
    return torch.cat([torch.cat([a, 2.0 * d], dim=1), torch.cat([torch.zeros_like(a), -a.T], dim=1)], dim=0)


def van_loan_norm(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||M||_1 (largest column sum) of the Van Loan block of (A, D): what the squaring count scales."""
    return _van_loan_block(a, d).abs().sum(dim=0).max()


def _needed_squarings(block: torch.Tensor, big_b: torch.Tensor) -> torch.Tensor:
    """The squaring count the batch needs, on the device (int64 scalar): max B x ||M||_1."""
    return _squarings(big_b.detach().abs().max() * block.detach().abs().sum(dim=0).max())


def _noise_cov_squarings(block: torch.Tensor, big_b: torch.Tensor) -> int:
    """One squaring count for the batch, set by its largest B: smaller steps only make the Taylor
    core more accurate, and a shared count needs no per-element select in the doubling loop.
    Under a :class:`HostPlan` (a training step on an accelerator) the count comes from the plan's
    host-side bounds instead of a read of the device."""
    if not big_b.numel():
        return 0
    plan = _PLAN.get()
    if plan is not None:
        return plan.squarings(block, big_b)
    return int(_needed_squarings(block, big_b))


# ---------------------------------------------------------------------- host-side plans
def squarings_for(norm_times_b: float) -> int:
    """The squaring count of :func:`_squarings` for a host number ||M||_1 x B (>= 0)."""
    return max(0, math.ceil(math.log2(max(norm_times_b, 1e-300) / _THETA)))


class HostPlan:
    """Host-side stand-ins for the values a training step would otherwise read from the device.

    On CUDA every ``int(tensor)`` or ``bool(tensor)`` waits for the GPU to finish all queued
    work, so the CPU stops queueing the next kernels: small networks then run at the speed of
    launches plus round trips.  Inside :func:`planned`, the squaring count of
    :func:`phi_and_noise_cov` is computed from ``block_norm`` (an upper bound on the Van Loan
    block's 1-norm ||M||_1) times ``max_b`` (an upper bound on B(t) over the batch), and the
    checks that would have read the device (the count really needed, a failed Cholesky) are
    kept as device flags in :attr:`flags`, read later with the loss (one transfer).

    More squarings than needed only shrink the Taylor core's step (every doubling adds PSD terms,
    :func:`phi_and_noise_cov`); one fewer than needed leaves ||h M||_1 <= 4, where the degree-24
    core's truncation is 4^25 / 25! ~ 7e-11: the flag ``radius`` is raised beyond that."""

    def __init__(self, block_norm: float, max_b: float):
        self.count = squarings_for(block_norm * max_b)
        self.flags: dict[str, torch.Tensor] = {}  # name -> device bool scalar (True: the check failed)

    def note(self, name: str, bad: torch.Tensor) -> None:
        """Keep a failed check (a device bool) without reading it."""
        bad = bad.detach().reshape(()).to(torch.bool)
        self.flags[name] = bad if name not in self.flags else self.flags[name] | bad

    def squarings(self, block: torch.Tensor, big_b: torch.Tensor) -> int:
        self.note("radius", _needed_squarings(block, big_b) > self.count + 1)
        return self.count


_PLAN: ContextVar[Optional[HostPlan]] = ContextVar("mdmsearch_host_plan", default=None)


def host_plan() -> Optional[HostPlan]:
    """The plan of the step being computed (None: read the device where needed)."""
    return _PLAN.get()


@contextmanager
def planned(plan: Optional[HostPlan]) -> Iterator[Optional[HostPlan]]:
    """Compute under ``plan`` (None: as without one)."""
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


# ---------------------------------------------------------------------- constants per device
# exponents k = 5 j + i of the degree-24 core, and 1 / k!; the Paterson-Stockmeyer coefficients
_CONSTANTS = {
    "k": lambda: torch.arange(_PS_BLOCK * _PS_BLOCKS, dtype=torch.float64),
    "inv_fact": lambda: torch.tensor([1.0 / math.factorial(k) for k in range(_PS_BLOCK * _PS_BLOCKS)],
                                     dtype=torch.float64),
    "ps_coef": lambda: torch.tensor(_PS_COEF, dtype=torch.float64),
}
_ON_DEVICE: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _constant(name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor, copied to ``device`` once (a host-to-device copy per call would make
    the GPU wait for the host)."""
    key = (name, dtype, device)
    out = _ON_DEVICE.get(key)
    if out is None:
        out = _ON_DEVICE[key] = _CONSTANTS[name]().to(dtype=dtype, device=device)
    return out


def _taylor_scaled(block: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """exp(h_i M) for one matrix M [m, m] at many steps h [N] (||h_i M||_1 <= 2), [N, m, m].

    Every X_i = h_i M shares its powers, so the degree-24 polynomial is
        p(h M) = sum_k (h^k / k!) M^k,
    with M^0..M^24 formed once (M^(5j + i) = (M^5)^j M^i: eight unbatched products) and the
    batch as one [N, 25] x [25, m^2] product.  The same polynomial as :func:`_taylor`, and
    with structurally zero entries of M^k exactly zero it keeps the relative precision of
    entries that are tiny at small h.  Its autograd graph is ~20 small unbatched nodes,
    where Paterson-Stockmeyer on the scaled batch recorded ~25 batched ones.
    """
    m = block.shape[-1]
    eye = torch.eye(m, dtype=block.dtype, device=block.device)
    m2 = block @ block
    low = torch.stack([eye, block, m2, m2 @ block, m2 @ m2])  # M^0..M^4, [5, m, m]
    m5 = low[4] @ block
    m10 = m5 @ m5
    high = torch.stack([eye, m5, m10, m10 @ m5, m10 @ m10])  # M^0, M^5, .., M^20
    powers = (high[:, None] @ low[None]).reshape(-1, m * m)  # [25, m^2]  M^(5j + i)
    k, inv_fact = _constant("k", torch.float64, h.device), _constant("inv_fact", torch.float64, h.device)
    coef = h[:, None].pow(k) * inv_fact  # [N, 25]  h^k / k!
    return (coef @ powers).reshape(-1, m, m)


class _Doublings(torch.autograd.Function):
    """s doublings S' = S + P S P^T, P' = P P of (Phi, S) [N, n, n], with a hand-written backward.

    Autograd through the loop would record ~5 tiny batched nodes per doubling, whose
    bookkeeping costs more than their arithmetic.  Reversed, with S symmetric:
        G_P <- (G_S' + G_S'^T) P S + G_P' P^T + P^T G_P',    G_S <- G_S' + P^T G_S' P.
    """

    @staticmethod
    def forward(ctx, phi, s, squarings: int):
        saved = []
        for _ in range(squarings):
            saved.extend((phi, s))
            s = torch.baddbmm(s, torch.bmm(phi, s), phi.transpose(-1, -2))
            phi = torch.bmm(phi, phi)
        ctx.save_for_backward(*saved)
        return phi, s

    @staticmethod
    def backward(ctx, g_phi, g_s):  # (an unused output's gradient arrives as zeros, not None)
        saved = ctx.saved_tensors
        for k in range(len(saved) - 2, -1, -2):
            phi, s = saved[k], saved[k + 1]  # [N, n, n] each, before doubling k / 2
            phi_t = phi.transpose(-1, -2)
            g_p = torch.bmm(torch.bmm(g_s + g_s.transpose(-1, -2), phi), s)  # from S'
            g_p = g_p + torch.baddbmm(torch.bmm(g_phi, phi_t), phi_t, g_phi)  # G_P' P^T + P^T G_P'
            g_s = torch.baddbmm(g_s, torch.bmm(phi_t, g_s), phi)
            g_phi = g_p
        return g_phi, g_s, None


def phi_and_noise_cov(a: torch.Tensor, d: torch.Tensor, big_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi = exp(B A) and S = int_0^B e^{uA} 2D e^{uA^T} du for B [N] (math note, sec. 2).

    Van Loan on a step h = B / 2^s small enough for the Taylor core,
        exp(h [[A, 2D], [0, -A^T]]) = [[Phi_h, F], [0, .]],  S_h = F Phi_h^T,
    then s doublings  S(2h) = S(h) + Phi(h) S(h) Phi(h)^T,  Phi(2h) = Phi(h)^2.
    Squaring the whole 2n x 2n block instead would carry exp(-B A^T), which grows like
    e^{B |Re lambda|} and destroys S for large B; every doubling here adds PSD terms, so
    no precision is lost at any t.  Returns ([N, n, n], [N, n, n]).

    The Taylor core shares the powers of the block across the batch (:func:`_taylor_scaled`)
    and the doublings have a hand-written backward pass (:class:`_Doublings`): one node for
    all doublings instead of ~5 per doubling.  Measured with the Cholesky and R of a training
    step (learned K = 3, batch 64, CPU): forward + backward 1.95 -> 1.75 ms.
    """
    n = a.shape[-1]
    block = _van_loan_block(a, d)  # [2n, 2n]
    squarings = _noise_cov_squarings(block, big_b)
    e = _taylor_scaled(block, big_b * 2.0**-squarings)  # [N, 2n, 2n]
    phi, f = e[:, :n, :n], e[:, :n, n:]
    s = torch.bmm(f, phi.transpose(-1, -2))
    s = 0.5 * (s + s.transpose(-1, -2))
    if squarings == 0:
        return phi, s
    return _Doublings.apply(phi, s, squarings)
