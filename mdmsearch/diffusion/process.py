"""The linear multivariate diffusion process (math note, sections 1-2 and 6).

    dz = beta(t) A z dt + sqrt(2 beta(t)) D^{1/2} dW,      A = -(Q + D) S_inf^{-1}

on z = (x, v_1, ..., v_K) with n = K + 1 variables per data coordinate.  The process is a
small ``nn.Module`` independent of training and search: it owns Q and D (fixed buffers or
constrained parameters), S_inf, the schedule beta(t) and gamma (the variance of
q(v_0 | x) = N(0, gamma I)).  All process matrices are float64; they are cast once, at the
point where they meet data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CholeskyError, InvalidStructureError
from . import draws
from .ops import apply_matrix, batch_view, host_plan, phi_and_noise_cov, sum_except_batch
from .params import mask_to_tuple
from .schedules import Schedule
from .structure import StructureCheck, check_matrices, check_structure, stable_hash

__all__ = ["Kernel", "LinearMDM"]

_DT = torch.float64
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class Kernel:
    """Transition q(z_t | z_0) at a batch of times, all float64, shapes [B] or [B, n, n]."""

    t: torch.Tensor  # [B]
    beta: torch.Tensor  # [B]  beta(t)
    big_b: torch.Tensor  # [B]  B(t) = int_0^t beta
    phi: torch.Tensor  # [B, n, n]  exp(B(t) A)
    sigma: torch.Tensor  # [B, n, n]  covariance of z_t given the conditioning
    chol: torch.Tensor  # [B, n, n]  lower Cholesky factor L_t of sigma


class LinearMDM(nn.Module):
    """A linear MDM with stationary law N(0, S_inf) per coordinate."""

    def __init__(
        self,
        q_module: nn.Module,
        d_module: nn.Module,
        *,
        schedule: Schedule,
        s_inf: torch.Tensor | None = None,
        gamma: float = 0.01,
        T: float = 1.0,
        name: str = "custom",
        d_param: str = "fixed",
    ):
        super().__init__()
        self.q_module = q_module
        self.d_module = d_module
        n = int(q_module().shape[0])
        s_inf = torch.ones(n, dtype=_DT) if s_inf is None else torch.as_tensor(s_inf, dtype=_DT)
        if s_inf.shape != (n,) or not bool((s_inf > 0).all()):
            raise ValueError(f"S_inf must be {n} positive variances, got {s_inf.tolist()}")
        if not gamma > 0:
            raise ValueError(f"gamma (variance of q(v0|x)) must be > 0, got {gamma}")
        self.register_buffer("s_inf", s_inf)  # [n] stationary variances
        self.schedule = schedule
        self.gamma = float(gamma)
        self.T = float(T)
        self.name = name
        self.d_param = d_param

    # ------------------------------------------------------------------ matrices
    @property
    def n(self) -> int:
        return int(self.s_inf.shape[0])

    @property
    def n_aux(self) -> int:
        return self.n - 1

    @property
    def learnable(self) -> bool:
        return bool(getattr(self.q_module, "learnable", False) or getattr(self.d_module, "learnable", False))

    @property
    def Q(self) -> torch.Tensor:
        """[n, n] float64, skew-symmetric."""
        return self.q_module()

    @property
    def D(self) -> torch.Tensor:
        """[n, n] float64, PSD."""
        return self.d_module()

    @property
    def D_factor(self) -> torch.Tensor:
        """[n, n] G with D = G G^T."""
        return self.d_module.factor()

    @property
    def A(self) -> torch.Tensor:
        """A = -(Q + D) S_inf^{-1}, [n, n] float64."""
        return -(self.Q + self.D) / self.s_inf  # divides column j by s_j

    def initial_cov(self, given: str = "x") -> torch.Tensor:
        """S_0 of the conditioning: diag(0, gamma, ..., gamma) given x; 0 given (x, v0)."""
        if given == "x":
            s0 = torch.full((self.n,), self.gamma, dtype=_DT, device=self.s_inf.device)
            s0[0] = 0.0
            return torch.diag(s0)
        if given == "xv":
            return torch.zeros(self.n, self.n, dtype=_DT, device=self.s_inf.device)
        raise ValueError(f"given must be 'x' or 'xv', got {given!r}")

    # ------------------------------------------------------------------ kernels
    def _as_time(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=_DT, device=self.s_inf.device)
        return t.reshape(-1)

    def marginal_covariance(self, t, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phi(t) and Sigma_t = Phi S_0 Phi^T + S(t) for t [B] (math note, section 2).

        S(t) = int_0^{B(t)} e^{uA} 2D e^{uA^T} du from the Van Loan block exponential
        exp(B [[A, 2D], [0, -A^T]]) = [[Phi, F], [0, Phi^{-T}]],  S = F Phi^T, evaluated by
        doubling so that it stays exact for large B too (see ``phi_and_noise_cov``).
        """
        t = self._as_time(t)
        phi, s = phi_and_noise_cov(self.A, self.D, self.schedule.integral(t))  # [B, n, n] each
        return phi, torch.baddbmm(s, phi @ s0.to(_DT), phi.transpose(-1, -2))  # Phi S_0 Phi^T + S

    def _covariance(self, big_b: torch.Tensor, given: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi, Sigma) at B(t) = ``big_b`` [B] of q(z_t | x) or q(z_t | x, v0)."""
        if given not in ("x", "xv"):
            raise ValueError(f"given must be 'x' or 'xv', got {given!r}")
        phi, s = phi_and_noise_cov(self.A, self.D, big_b)  # [B, n, n] each
        if given == "xv":  # S_0 = 0
            return phi, s
        aux = phi[:, :, 1:]  # [B, n, K]: S_0 = diag(0, gamma, ..., gamma)
        return phi, torch.baddbmm(s, aux, aux.transpose(-1, -2), alpha=self.gamma)  # Phi S_0 Phi^T + S

    def transition(self, t, given: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi, Sigma), each [B, n, n] float64, of q(z_t | x) or q(z_t | x, v0)."""
        return self._covariance(self.schedule.integral(self._as_time(t)), given)

    def cholesky(self, sigma: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Cholesky factor in float64; a failure names Q and D instead of returning garbage."""
        chol, info = torch.linalg.cholesky_ex(sigma)
        plan = host_plan()
        if plan is not None:  # a training step on an accelerator: the failure is read later, with the loss
            plan.note("cholesky", (info != 0).any())
            return chol
        if bool((info != 0).any()):
            bad = int(torch.nonzero(info)[0, 0])
            at = float(t[bad]) if t is not None else None
            when = f" at t={at:.3g}" if at is not None else ""
            raise CholeskyError(
                f"transition covariance is not positive definite{when} for process {self.name!r} "
                f"with Q={_fmt(self.Q)} D={_fmt(self.D)} (no jitter is added; check the structure)",
                process=self.name, t=at, Q=self.Q.detach().tolist(), D=self.D.detach().tolist())
        return chol

    def kernel(self, t, given: str = "x") -> Kernel:
        t = self._as_time(t)
        big_b = self.schedule.integral(t)
        phi, sigma = self._covariance(big_b, given)
        return self._kernel(t, big_b, phi, sigma)

    def _kernel(self, t: torch.Tensor, big_b: torch.Tensor, phi: torch.Tensor, sigma: torch.Tensor) -> Kernel:
        return Kernel(t=t, beta=self.schedule.beta(t), big_b=big_b, phi=phi, sigma=sigma, chol=self.cholesky(sigma, t))

    def kernel_and_end(self, t) -> tuple[Kernel, tuple[torch.Tensor, torch.Tensor]]:
        """The given-x kernel at t [B] and (Phi, Sigma) at T ([1, n, n] each) from one batched
        exponential: a training step needs both (the diffusion term and the prior term)."""
        t = self._as_time(t)
        big_b = self.schedule.integral(torch.cat([t, t.new_full((1,), self.T)]))  # [B + 1]
        phi, sigma = self._covariance(big_b, "x")
        return self._kernel(t, big_b[:-1], phi[:-1], sigma[:-1]), (phi[-1:], sigma[-1:])

    # ------------------------------------------------------------------ states
    def embed(self, x: torch.Tensor, v0: torch.Tensor | None = None) -> torch.Tensor:
        """z_0 = (x, v0) [B, n, *shape]; v0 = 0 when None."""
        if v0 is None:
            v0 = x.new_zeros(x.shape[0], self.n_aux, *x.shape[1:])
        return torch.cat([x.unsqueeze(1), v0], dim=1)

    def mean(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """m_t = Phi (x, 0, ..., 0): only Phi's first column acts.  x [B, *shape] -> [B, n, *shape]."""
        col = phi[:, :, 0].to(x.dtype)  # [B, n]
        return col.reshape(*col.shape, *([1] * (x.dim() - 1))) * x.unsqueeze(1)

    def perturb(
        self,
        x: torch.Tensor,
        t,
        *,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        kernel: Kernel | None = None,
        aux_generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Kernel]:
        """Draw z_t ~ q(z_t | x) = N(m_t, Sigma_t): z_t = m_t + L_t eps.  Returns (z_t, eps, kernel).

        eps [B, n, *shape] comes from ``generator``; with ``aux_generator``, eps[:, :1] (the data
        coordinate) from ``generator`` and eps[:, 1:] (the K auxiliaries) from ``aux_generator``, so
        that the data coordinate's noise is the same draw whatever K (common random numbers)."""
        kern = kernel if kernel is not None else self.kernel(t, given="x")
        if eps is None and aux_generator is not None:
            shape = (x.shape[0], *x.shape[1:])
            eps = torch.cat([draws.randn((shape[0], 1, *shape[1:]), generator, dtype=x.dtype, device=x.device),
                             draws.randn((shape[0], self.n_aux, *shape[1:]), aux_generator, dtype=x.dtype,
                                         device=x.device)], dim=1)
        elif eps is None:
            eps = draws.randn((x.shape[0], self.n, *x.shape[1:]), generator, dtype=x.dtype, device=x.device)
        z = self.mean(x, kern.phi) + apply_matrix(kern.chol, eps)  # [B, n, *shape]
        return z, eps, kern

    def sample_v0(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """v0 ~ q(v0 | x) = N(0, gamma I), [B, K, *shape]."""
        shape = (x.shape[0], self.n_aux, *x.shape[1:])
        return math.sqrt(self.gamma) * draws.randn(shape, generator, dtype=x.dtype, device=x.device)

    # ------------------------------------------------------------------ prior
    def sample_prior(self, batch: int, data_shape, *, generator=None, device=None, dtype=torch.float32):
        """z_T ~ pi = N(0, S_inf) per coordinate, [B, n, *data_shape]."""
        eps = torch.randn((batch, self.n, *data_shape), generator=generator, device=device, dtype=dtype)
        std = self.s_inf.sqrt().to(dtype=dtype, device=eps.device)
        return eps * std.reshape(1, -1, *([1] * len(data_shape)))

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log pi(z) summed over coordinates, [B]."""
        s = self.s_inf.to(z.dtype).reshape(1, -1, *([1] * (z.dim() - 2)))
        d = z[0, 0].numel()
        quad = sum_except_batch(z * z / s)
        return -0.5 * (d * (self.n * _LOG_2PI + torch.log(self.s_inf).sum().to(z.dtype)) + quad)

    def prior_term(self, x: torch.Tensor, at_end: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """E_{q(z_T|x)} log pi(z_T), exactly (math note, section 3), [B].  ``at_end``: (Phi, Sigma)
        at T given x when the caller has them already (:meth:`kernel_and_end`)."""
        phi, sigma = at_end if at_end is not None else self.transition(torch.full((1,), self.T), given="x")
        d = x[0].numel()
        inv_s = 1.0 / self.s_inf
        const = self.n * _LOG_2PI + torch.log(self.s_inf).sum() + (torch.diagonal(sigma[0]) * inv_s).sum()
        coef = (phi[0, :, 0] ** 2 * inv_s).sum()  # m_T^T S^-1 m_T = coef * x^2 per coordinate
        xsq = sum_except_batch(x.to(_DT) ** 2)
        return (-0.5 * (d * const + coef * xsq)).to(x.dtype)

    def prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """Prior gap E KL(q(z_T | x) || pi) summed over coordinates (nats), [B]."""
        phi, sigma = self.transition(torch.full((1,), self.T), given="x")
        d = x[0].numel()
        inv_s = 1.0 / self.s_inf
        logdet_sig = 2.0 * torch.log(torch.diagonal(self.cholesky(sigma)[0])).sum()
        per_coord = (torch.diagonal(sigma[0]) * inv_s).sum() - self.n + torch.log(self.s_inf).sum() - logdet_sig
        coef = (phi[0, :, 0] ** 2 * inv_s).sum()
        xsq = sum_except_batch(x.to(_DT) ** 2)
        return (0.5 * (d * per_coord + coef * xsq)).to(x.dtype)

    def entropy_v0(self, d: int) -> torch.Tensor:
        """H[q(v0 | x)] = d K / 2 log(2 pi e gamma)."""
        return torch.tensor(0.5 * d * self.n_aux * math.log(2 * math.pi * math.e * self.gamma))

    # ------------------------------------------------------------------ SDE pieces
    def drift(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(z, t) = beta(t) A z, [B, n, *shape]."""
        beta = self.schedule.beta(self._as_time(t)).to(z.dtype)
        return batch_view(beta, z) * apply_matrix(self.A, z)

    def div_drift(self, t, d: int) -> torch.Tensor:
        """div f = beta(t) tr(A) d, [B] float64."""
        return self.schedule.beta(self._as_time(t)) * torch.trace(self.A) * d

    # ------------------------------------------------------------------ structure
    def check(self) -> StructureCheck:
        """Validity of this process: for learnable parts the generic structure check, for fixed
        values the concrete one (math note, section 6)."""
        if self.learnable:
            d_mask = self.d_module.mask
            return check_structure(self.n, self.q_module.mask, d_mask, self.d_param, self.s_inf)
        return check_matrices(self.Q, self.D, self.s_inf)

    def validate(self) -> "LinearMDM":
        res = self.check()
        if not res.valid:
            raise InvalidStructureError(f"process {self.name!r} is invalid: {res.reason}")
        return self

    def structure(self) -> dict:
        """Hashable description of the discrete structure and fixed hyperparameters."""
        info = {
            "family": self.name,
            "n_aux": self.n_aux,
            "q_mask": mask_to_tuple(self.q_module.mask),
            "d_mask": mask_to_tuple(self.d_module.mask),
            "d_param": self.d_param,
            "learnable": self.learnable,
            "s_inf": [float(v) for v in self.s_inf],
            "gamma": self.gamma,
            "T": self.T,
            "schedule": self.schedule.to_dict(),
        }
        if not self.learnable:
            info["Q"] = [[round(float(v), 12) for v in row] for row in self.Q]
            info["D"] = [[round(float(v), 12) for v in row] for row in self.D]
        return info

    def structure_hash(self) -> str:
        return stable_hash(self.structure())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n={self.n}, d_param={self.d_param!r}, schedule={self.schedule}"


def _fmt(m: torch.Tensor) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{float(v):.4g}" for v in row) + "]" for row in m.detach()) + "]"
