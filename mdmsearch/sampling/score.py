"""Score callables for samplers and the exact likelihood (math note, sections 3 and 8).

A noise-prediction model ``eps_model(z, t) -> eps_hat`` (trained with z_t = m_t + L_t eps,
L_t the Cholesky factor of the transition covariance *given x*) defines the score

    s(z, t) = -L_t^{-T} eps_hat(z, t),

the same map as :func:`mdmsearch.objectives.elbo.eps_from_model` inverts.  Every sampler
and the likelihood only ever see a plain ``score(z, t)`` callable with z [B, n, *shape]
and t a float tensor [B].
"""

from __future__ import annotations

from typing import Callable

import torch

from ..diffusion.ops import apply_matrix, inv_lower
from ..diffusion.process import Kernel, LinearMDM
from ..objectives.residual import is_kernel_aware

__all__ = ["Score", "PARAMETERIZATIONS", "score_fn", "inv_chol_t"]

_DT = torch.float64
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "score")


def _kernel(process: LinearMDM, t: torch.Tensor) -> Kernel:
    """The given-x kernel at times t [B]; when all times are equal (the usual case inside a
    sampler) it is computed once, batch 1, so a step costs one n x n factorization, not B."""
    t = torch.as_tensor(t, dtype=_DT, device=process.s_inf.device).reshape(-1)  # [B]
    same = t.numel() > 1 and bool((t == t[0]).all())
    return process.kernel(t[:1] if same else t, given="x")


def _inv_lt(chol: torch.Tensor) -> torch.Tensor:
    return inv_lower(chol).transpose(-1, -2)  # L^{-T}


def inv_chol_t(process: LinearMDM, t: torch.Tensor) -> torch.Tensor:
    """L_t^{-T} of the given-x kernel at times t [B] -> [B, n, n] float64."""
    n_t = torch.as_tensor(t).reshape(-1).numel()
    return _inv_lt(_kernel(process, t).chol).expand(n_t, -1, -1)


def score_fn(process: LinearMDM, model: Callable, parameterization: str = "eps") -> Score:
    """Wrap ``model`` as ``score(z, t) -> s`` of z's shape [B, n, *shape].

    parameterization="eps": s = -L_t^{-T} eps_hat, with L_t from ``process.kernel(t,
    given="x").chol`` (float64, cast to z's dtype once per call);
    parameterization="score": the model's output is the score itself.
    The model is called as ``model(z, t)`` with t [B] in z's dtype and device; a kernel-aware
    model (the Gaussian residual) as ``model(z, t, kernel)`` with the given-x kernel, computed
    once per call and used for both its Gaussian part and L_t.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")

    def score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device).reshape(-1)
        if t.numel() == 1 and z.shape[0] != 1:
            t = t.expand(z.shape[0])
        if is_kernel_aware(model):
            kern = _kernel(process, t)
            out = model(z, t.to(z.dtype), kern)  # eps_hat, [B, n, *shape]
            inv_lt = _inv_lt(kern.chol).expand(z.shape[0], -1, -1)
            return -apply_matrix(inv_lt.to(dtype=z.dtype, device=z.device), out)
        out = model(z, t.to(z.dtype))  # [B, n, *shape]
        if parameterization == "score":
            return out
        inv_lt = inv_chol_t(process, t).to(dtype=z.dtype, device=z.device)  # [B, n, n], cast once
        return -apply_matrix(inv_lt, out)

    return score
