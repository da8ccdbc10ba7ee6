"""The ELBO of any linear MDM given x (math note, sections 3-4).

    log p(x) >= E log pi(z_T)                                   exact (prior_term)
              + int_{t_min}^T E[-1/2 |s - grad log q|^2_M + 1/2 |grad log q|^2_M + div f] dt
              + H[q(v0 | x)]                                     exact (entropy_v0)
              + E[log p(z_0 | u) - log q(u | z_0)]               truncation at t_min

Models are noise predictors ``eps_model(z, t) -> eps_hat`` (``parameterization="eps"``),
with s = -L_t^{-T} eps_hat, or plain score callables ``score(z, t)``
(``parameterization="score"``), e.g. an analytic oracle.  A kernel-aware noise predictor
(``model.kernel_aware``, e.g. the Gaussian-residual :class:`ResidualEps`) is called as
``model(z, t, kernel)`` with the given-x kernel the ELBO already computed.
z: [B, n, *shape], t: [B].
Per-example results are float64 [B] in nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..diffusion import draws
from ..diffusion.ops import apply_matrix, inv_lower, sum_except_batch
from ..diffusion.process import Kernel, LinearMDM
from .residual import gaussian_dsm_expectation, gaussian_error, is_kernel_aware
from .time_sampling import TimeSampler, make_time_sampler

__all__ = ["ELBOTerms", "elbo", "elbo_terms", "elbo_ism", "diffusion_term_dsm", "truncation_term", "eps_from_model"]

_DT = torch.float64
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ELBOTerms:
    """Per-example pieces of the bound, float64 [B] each (truncation may be 0)."""

    prior: torch.Tensor
    diffusion: torch.Tensor
    entropy: torch.Tensor
    truncation: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.diffusion + self.entropy + self.truncation


def _inv_chol_t(kern: Kernel) -> torch.Tensor:
    """L_t^{-T}, [B, n, n] float64."""
    return inv_lower(kern.chol).transpose(-1, -2)


def _direction(inv_lt: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = L^{-1} Phi e_1 [B, n] and a = |q|^2 [B] of the Gaussian residual, from L^{-T} [B, n, n]."""
    q = (inv_lt.transpose(-1, -2) @ phi[..., :1]).squeeze(-1)
    return q, q.pow(2).sum(-1)


def eps_from_model(model: Model, z: torch.Tensor, t: torch.Tensor, kernel: Kernel, parameterization: str) -> torch.Tensor:
    """The model's noise prediction eps_hat at z [B, n, *shape] with the given-x ``kernel`` at t
    ([B] or [1] times); a score model s gives eps_hat = -L^T s.  A kernel-aware model gets
    the kernel as its third argument."""
    if is_kernel_aware(model):
        if parameterization != "eps":
            raise ValueError("a kernel-aware (Gaussian-residual) model predicts eps")
        return model(z, t.to(z.dtype), kernel)
    out = model(z, t.to(z.dtype))
    if parameterization == "eps":
        return out
    if parameterization == "score":
        lt = kernel.chol.transpose(-1, -2).expand(z.shape[0], -1, -1)  # L^T, [B, n, n]
        return -apply_matrix(lt, out)
    raise ValueError(f"parameterization must be 'eps' or 'score', got {parameterization!r}")


def diffusion_term_dsm(
    process: LinearMDM,
    x: torch.Tensor,
    model: Model,
    t: torch.Tensor,
    weight: torch.Tensor,
    *,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    rao_blackwell: bool = True,
    kernel: Kernel | None = None,
    aux_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-sample estimate of the time integral (denoising form), [B] float64.  ``aux_generator``:
    the auxiliaries' noise apart from the data coordinate's (:meth:`LinearMDM.perturb`).

    |s - grad log q|^2_M = |R (eps_hat - eps)|^2 with R = sqrt(2 beta) G^T L^{-T} (D = G G^T),
    and E|grad log q|^2_M = d tr(M Sigma^{-1}) = d ||R||_F^2, exactly.

    For a Gaussian-residual model (eps_hat = eps_G + r) and ``rao_blackwell``, the square
    splits into |R(eps_G - eps)|^2 + 2 <R(eps_G - eps), R r> + |R r|^2 and the first part is
    replaced by its exact expectation over eps given (x, t): unbiased, and only the terms
    that involve the network are left to Monte Carlo.
    """
    d, n = x[0].numel(), process.n
    z, eps, kern = process.perturb(x, t, generator=generator, kernel=kernel,
                                   aux_generator=aux_generator)  # z, eps: [B, n, *shape]
    # one triangular solve gives L^{-1} G (so R^T) and q = L^{-1} Phi e_1 (the residual's direction)
    g = process.D_factor.expand(z.shape[0], -1, -1)  # [B, n, n]
    sol = torch.linalg.solve_triangular(kern.chol, torch.cat([g, kern.phi[..., :1]], dim=-1), upper=False)
    scale = torch.sqrt(2.0 * kern.beta)[:, None, None]  # [B, 1, 1]
    r = scale * sol[..., :n].transpose(-1, -2)  # R = sqrt(2 beta) G^T L^{-T}, [B, n, n]
    if _is_residual(model):
        q = sol[..., n]  # [B, n]
        a = q.pow(2).sum(-1)  # [B]  |q|^2
    if _is_residual(model) and rao_blackwell:
        res = model.net(z, kern.t.to(z.dtype))  # the residual r, [B, n, *shape]
        gauss = gaussian_error(model.stats, x, eps, q, a)  # eps_G - eps
        # 2 <R gauss, R res> + |R res|^2 = res^T (R^T R) (2 gauss + res), per coordinate
        mc = sum_except_batch(res * apply_matrix(torch.bmm(r.transpose(-1, -2), r), 2.0 * gauss + res)).to(_DT)
        dsm = gaussian_dsm_expectation(model.stats, x, q, a, r) + mc  # [B]
    elif _is_residual(model):
        eps_hat = model.given_noise(z, kern.t.to(z.dtype), x, eps, q, a)
        dsm = sum_except_batch(apply_matrix(r, eps_hat - eps).pow(2)).to(_DT)
    else:
        eps_hat = eps_from_model(model, z, kern.t, kern, parameterization)
        dsm = sum_except_batch(apply_matrix(r, eps_hat - eps).pow(2)).to(_DT)  # [B]
    tr_m_sigma_inv = r.pow(2).sum(dim=(-1, -2))  # [B]
    integrand = -0.5 * dsm + 0.5 * d * tr_m_sigma_inv + process.div_drift(kern.t, d)
    return weight * integrand


def truncation_term(
    process: LinearMDM,
    x: torch.Tensor,
    model: Model,
    t_min: float,
    *,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E[log p(z_0 | u) - log q(u | z_0)] at u = z_{t_min}, z_0 = (x, v0) (section 4), [B].

    With p(z_0|u) = N(Phi^{-1}(u + Sigma s), Phi^{-1} Sigma Phi^{-T}) and u = Phi z_0 + L eps
    (Phi, Sigma, L given (x, v0)), the log-determinants cancel and the term is
        d B(t_min) tr(A) + 1/2 |eps|^2 - 1/2 |eps + L^T s|^2,
    so no tiny covariance is ever inverted.
    """
    d = x[0].numel()
    batch = x.shape[0]
    t = torch.full((batch,), float(t_min), dtype=_DT, device=process.s_inf.device)
    kern_xv = process.kernel(t[:1], given="xv")
    v0 = process.sample_v0(x, generator)  # [B, K, *shape]
    eps = draws.randn((batch, process.n, *x.shape[1:]), generator, dtype=x.dtype, device=x.device)
    # u = Phi z0 + L eps = Phi e_1 x + w, w = Phi[:, 1:] v0 + L eps (w ~ N(0, Sigma given x))
    w = apply_matrix(kern_xv.chol[0], eps) + apply_matrix(kern_xv.phi[0], process.embed(torch.zeros_like(x), v0))
    u = process.mean(x, kern_xv.phi) + w
    # the model's score at u uses the given-x kernel it was trained with: s = -L_x^{-T} eps_hat
    kern_x = process.kernel(t[:1], given="x")
    inv_lt_x = _inv_chol_t(kern_x)
    if _is_residual(model):
        # u = Phi e_1 x + L_x e with e = L_x^{-1} w: the Gaussian part from (x, e), without cancellation
        q, a = (v.expand(batch, *v.shape[1:]) for v in _direction(inv_lt_x, kern_x.phi))
        e = apply_matrix(inv_lt_x[0].T, w)
        eps_hat = model.given_noise(u, t.to(u.dtype), x, e, q, a)
    else:
        eps_hat = eps_from_model(model, u, t, kern_x, parameterization)
    # L_xv^T s = -(L_xv^T L_x^{-T}) eps_hat
    proj = kern_xv.chol[0].T @ inv_lt_x[0]  # [n, n]
    resid = eps - apply_matrix(proj, eps_hat)
    logdet_phi = d * kern_xv.big_b[0] * torch.trace(process.A)
    return logdet_phi + 0.5 * (sum_except_batch(eps.pow(2)) - sum_except_batch(resid.pow(2))).to(_DT)


def _is_residual(model) -> bool:
    """A Gaussian-residual model (eps_G + net) whose Gaussian part the ELBO computes from (x, eps)."""
    return is_kernel_aware(model) and hasattr(model, "given_noise")


def _sampler(process, time_sampler, t_min) -> TimeSampler:
    if isinstance(time_sampler, TimeSampler):
        return time_sampler
    return make_time_sampler(time_sampler, process, t_min=t_min)


def elbo_terms(
    process: LinearMDM,
    x: torch.Tensor,
    model: Model,
    *,
    parameterization: str = "eps",
    time_sampler: TimeSampler | str = "vp",
    t_min: float = 1e-3,
    n_t: int = 1,
    truncation: bool = True,
    generator: torch.Generator | None = None,
    time_generator: torch.Generator | None = None,
    rao_blackwell: bool = True,
    aux_generator: torch.Generator | None = None,
) -> ELBOTerms:
    """All pieces of the per-example ELBO of x [B, *shape] (nats).

    ``time_generator`` (default: ``generator``) draws the times alone, so that evaluations of
    different processes share their time strata whatever the number of variables (common
    random numbers); ``aux_generator`` (default: ``generator``) draws the auxiliaries' noise
    of the time integral apart from the data coordinate's, which then is the same draw whatever
    K (training; the truncation term draws from ``generator``); ``rao_blackwell`` see
    :func:`diffusion_term_dsm`."""
    sampler = _sampler(process, time_sampler, t_min)
    batch = x.shape[0]
    diff = torch.zeros(batch, dtype=_DT, device=x.device)
    at_end = None
    for i in range(n_t):
        # sample i covers the i-th stratum of p(t): unbiased, much lower variance than iid draws
        t, w = sampler.sample(batch, generator=time_generator or generator, device=process.s_inf.device,
                              stratum=(i, n_t))
        kern = None
        if i == 0:  # the prior term's transition at T rides along in the same batched exponential
            kern, at_end = process.kernel_and_end(t)
        diff = diff + diffusion_term_dsm(process, x, model, t, w, parameterization=parameterization, generator=generator,
                                         rao_blackwell=rao_blackwell, kernel=kern, aux_generator=aux_generator)
    trunc = (
        truncation_term(process, x, model, sampler.t_min, parameterization=parameterization, generator=generator)
        if truncation
        else torch.zeros_like(diff)
    )
    return ELBOTerms(
        prior=process.prior_term(x, at_end).to(_DT),
        diffusion=diff / n_t,
        entropy=process.entropy_v0(x[0].numel()).to(_DT).expand(batch),
        truncation=trunc,
    )


def elbo(process: LinearMDM, x: torch.Tensor, model: Model, **kwargs) -> torch.Tensor:
    """Per-example ELBO in nats, float64 [B].  See :func:`elbo_terms` for the options.

    Training passes ``truncation=False`` (the decoder term costs a second network pass and is
    small: 0.001-0.014 nats/dim for trained digits models); evaluation and reported bits per
    dimension include it.
    """
    return elbo_terms(process, x, model, **kwargs).total


def elbo_ism(
    process: LinearMDM,
    x: torch.Tensor,
    model: Model,
    *,
    parameterization: str = "eps",
    time_sampler: TimeSampler | str = "vp",
    t_min: float = 1e-3,
    n_t: int = 1,
    truncation: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Implicit-score-matching form of the same bound, with a Hutchinson divergence:

        int E_{q(z_t|x)}[-1/2 |s|^2_M - div(M s) + div f] dt     (plus the exact prior,
                                                                   entropy and truncation)
    An independent check of :func:`elbo` (same expectation, different estimator).
    """
    sampler = _sampler(process, time_sampler, t_min)
    batch, d = x.shape[0], x[0].numel()
    total = torch.zeros(batch, dtype=_DT, device=x.device)
    g = process.D_factor
    keep_graph = torch.is_grad_enabled()  # differentiate through the divergence when training
    for i in range(n_t):
        t, w = sampler.sample(batch, generator=generator, device=process.s_inf.device, stratum=(i, n_t))
        z, _, kern = process.perturb(x, t, generator=generator)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            inv_lt = _inv_chol_t(kern)
            eps_hat = eps_from_model(model, z, kern.t, kern, parameterization)
            score = -apply_matrix(inv_lt, eps_hat)  # s = -L^{-T} eps_hat
            m_score = apply_matrix(2.0 * kern.beta[:, None, None] * (g @ g.T), score)  # M s
            probe = torch.randint(0, 2, z.shape, generator=generator, device=z.device).to(z.dtype) * 2 - 1
            (jvp,) = torch.autograd.grad((m_score * probe).sum(), z, create_graph=keep_graph)
        div_ms = sum_except_batch(jvp * probe).to(_DT)
        sq = sum_except_batch(score * m_score).to(_DT)  # |s|^2_M
        total = total + w * (-0.5 * sq - div_ms + process.div_drift(kern.t, d))
    trunc = (
        truncation_term(process, x, model, sampler.t_min, parameterization=parameterization, generator=generator)
        if truncation
        else torch.zeros_like(total)
    )
    return process.prior_term(x).to(_DT) + total / n_t + process.entropy_v0(d).to(_DT) + trunc
