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

from ..diffusion.ops import apply_matrix
from ..diffusion.process import LinearMDM

__all__ = ["Score", "PARAMETERIZATIONS", "score_fn", "inv_chol_t"]

_DT = torch.float64
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "score")


def inv_chol_t(process: LinearMDM, t: torch.Tensor) -> torch.Tensor:
    """L_t^{-T} of the given-x kernel at times t [B] -> [B, n, n] float64.

    When all times are equal (the usual case inside a sampler) the kernel is computed once
    and expanded, so a step costs one n x n factorization, not B of them.
    """
    t = torch.as_tensor(t, dtype=_DT, device=process.s_inf.device).reshape(-1)  # [B]
    same = t.numel() > 1 and bool((t == t[0]).all())
    chol = process.kernel(t[:1] if same else t, given="x").chol  # [1 or B, n, n]
    eye = torch.eye(chol.shape[-1], dtype=_DT, device=chol.device).expand_as(chol)
    inv_lt = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # L^{-T}
    return inv_lt.expand(t.numel(), -1, -1) if same else inv_lt


def score_fn(process: LinearMDM, model: Callable, parameterization: str = "eps") -> Score:
    """Wrap ``model`` as ``score(z, t) -> s`` of z's shape [B, n, *shape].

    parameterization="eps": s = -L_t^{-T} eps_hat, with L_t from ``process.kernel(t,
    given="x").chol`` (float64, cast to z's dtype once per call);
    parameterization="score": the model's output is the score itself.
    The model is called as ``model(z, t)`` with t [B] in z's dtype and device.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")

    def score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device).reshape(-1)
        if t.numel() == 1 and z.shape[0] != 1:
            t = t.expand(z.shape[0])
        out = model(z, t.to(z.dtype))  # [B, n, *shape]
        if parameterization == "score":
            return out
        inv_lt = inv_chol_t(process, t).to(dtype=z.dtype, device=z.device)  # [B, n, n], cast once
        return -apply_matrix(inv_lt, out)

    return score
