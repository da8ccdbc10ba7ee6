"""What a process's auxiliary variables do for the data: coupling, effective K and structure
(math note, section 9).

A searched structure says which entries of Q and D are free; training decides their values,
and may switch the auxiliaries off (x-aux entries driven to ~0: the data diffuses alone).
This module measures that on concrete matrices, through the transition kernel given x:

    z_t = Phi(t) (x0, 0, ..., 0) + noise,  noise ~ N(0, Sigma_t)           (per coordinate)
    J_S(t) = phi_S^T Sigma_{S,S}^{-1} phi_S,  phi = Phi(t)[:, 0]            (precision about x0
                                                                             from the variables S)
    share_S = mean over t of 1 - J_{x u S}(t) / J_all(t)                   (in [0, 1])

J_S(t) is the posterior precision of x0 (flat prior) when only the variables S of z_t are seen.
``share`` (the auxiliaries' share) = 1 - J_x / J_all: the fraction of what the state knows about
x0 that needs the auxiliaries.  An auxiliary cut off from x in both Q and D keeps Phi and
Sigma block diagonal, so its share is exactly 0; one that reaches x only through other
auxiliaries (a chain) still adds to J_all.  The effective auxiliaries are the smallest set S
with ``1 - J_{x u S} / J_all < THRESHOLD`` (all subsets for K <= 8): the auxiliaries the score
network must see to know (almost) all the state knows about x0, plus the bridges through which
their information flows (the auxiliaries on each one's widest path to x in the graph of
|Q_ij| + |D_ij|).  Their number is the effective K, and the entries of Q and D among x and S that are at least ENTRY_THRESHOLD of the largest
give the effective patterns (named when they match a pattern of ``structure.py``, else listed),
with each effective auxiliary's link on its widest path to x always included.

Pure float64 functions of (Q, D, S_inf, gamma, B(t)); ``process_coupling`` reads them off a
:class:`~mdmsearch.diffusion.process.LinearMDM`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .ops import phi_and_noise_cov
from .structure import D_PATTERNS, Q_PATTERNS

__all__ = ["THRESHOLD", "ENTRY_THRESHOLD", "T_MIN", "N_T", "Coupling", "coupling", "precision", "process_coupling",
           "time_grid"]

_DT = torch.float64
# An auxiliary set matters when it holds >= 1% of the precision about x0 (averaged over t).
THRESHOLD = 0.01
# An entry belongs to the effective structure when |entry| >= 5% of the largest entry of Q and D
# among the variables that matter (relative to the process's own scale).
ENTRY_THRESHOLD = 0.05
# The time grid the shares are averaged on: N_T midpoints of [T_MIN, T] (fixed, so that runs
# trained with different t_min are measured alike).
T_MIN, N_T = 1e-3, 64
_MAX_EXHAUSTIVE_K = 8  # beyond this the smallest set is grown greedily
# Q patterns before D's; the first exact match names a mask (n = 1: "none" / "diag")
_Q_ORDER = ("none", "chain", "full")
_D_ORDER = ("diag", "last", "aux", "chain", "full")


@dataclass(frozen=True)
class Coupling:
    """The coupling of a process's auxiliaries to the data (see the module docstring)."""

    n_aux: int
    share: float  # precision share of all auxiliaries together (0: x alone knows everything)
    unique: tuple[float, ...]  # per auxiliary k = 1..K: share lost when only v_k is not seen
    effective: tuple[int, ...]  # the auxiliaries that matter (1-based), the smallest sufficient set
    q_pattern: str  # effective Q pattern on (x, effective auxiliaries): a pattern name or its entries
    d_pattern: str
    q_mask: tuple[tuple[int, ...], ...]  # strict upper 0/1 mask of the effective Q
    d_mask: tuple[tuple[int, ...], ...]  # symmetric 0/1 mask of the effective D
    d_xx: float  # D's data entry (the data's own noise rate)
    threshold: float = THRESHOLD

    @property
    def n_eff(self) -> int:
        return len(self.effective)

    @property
    def collapsed(self) -> bool:
        """Training left fewer auxiliaries that matter than the structure has."""
        return self.n_eff < self.n_aux

    @property
    def label(self) -> str:
        """e.g. "K=0 (x alone, D_xx=0.71)" or "K=2 Q:chain D:diag"."""
        if self.n_eff == 0:
            return f"K=0 (x alone, D_xx={self.d_xx:.2g})"
        return f"K={self.n_eff} Q:{self.q_pattern} D:{self.d_pattern}"

    def to_dict(self) -> dict:
        return {"n_aux": self.n_aux, "n_eff": self.n_eff, "collapsed": self.collapsed, "label": self.label,
                "share": self.share, "unique": list(self.unique), "effective": list(self.effective),
                "q_pattern": self.q_pattern, "d_pattern": self.d_pattern, "q_mask": [list(r) for r in self.q_mask],
                "d_mask": [list(r) for r in self.d_mask], "d_xx": self.d_xx, "threshold": self.threshold}


def time_grid(T: float = 1.0, t_min: float = T_MIN, n_t: int = N_T) -> torch.Tensor:
    """[n_t] midpoints of n_t equal cells of [t_min, T], float64."""
    return t_min + (T - t_min) * (torch.arange(n_t, dtype=_DT) + 0.5) / n_t


def _kernel_given_x(q, d, s_inf, gamma: float, big_b) -> tuple[torch.Tensor, torch.Tensor]:
    """phi = Phi(t)[:, 0] [N, n] and Sigma_t [N, n, n] of q(z_t | x) (math note, section 2):
    A = -(Q + D) S_inf^{-1}, S_0 = diag(0, gamma, ..., gamma), Sigma = Phi S_0 Phi^T + S(t)."""
    a = -(q + d) / s_inf  # column j divided by s_j
    phi, s = phi_and_noise_cov(a, d, big_b)  # [N, n, n] each
    aux = phi[:, :, 1:]  # [N, n, K]
    sigma = s + gamma * aux @ aux.transpose(-1, -2)
    return phi[:, :, 0], sigma


def precision(phi0: torch.Tensor, sigma: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """J_S(t) = phi_S^T Sigma_{S,S}^{-1} phi_S [N] for the variables ``keep`` (S): the posterior
    precision of x0 from those coordinates of z_t.  phi0 [N, n], sigma [N, n, n]."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    f = phi0[:, idx].unsqueeze(-1)  # [N, |S|, 1]
    s = sigma[:, idx][:, :, idx]  # [N, |S|, |S|]
    chol = torch.linalg.cholesky(s)
    w = torch.cholesky_solve(f, chol)  # Sigma_SS^{-1} phi_S
    return (f * w).sum(dim=(-2, -1))


def _loss(j_all: torch.Tensor, phi0, sigma, aux: tuple[int, ...]) -> float:
    """mean_t 1 - J_{x u S} / J_all: the share of the precision about x0 lost seeing only x and S."""
    return float((1.0 - precision(phi0, sigma, [0, *aux]) / j_all).mean().clamp_min(0.0))


def _smallest_set(j_all, phi0, sigma, n_aux: int, threshold: float) -> tuple[int, ...]:
    """The smallest set of auxiliaries (1-based) whose loss is below ``threshold``; among sets
    of that size the one with the smallest loss.  Exhaustive for K <= 8, else greedy."""
    if n_aux <= _MAX_EXHAUSTIVE_K:
        for size in range(n_aux + 1):
            losses = {s: _loss(j_all, phi0, sigma, s) for s in itertools.combinations(range(1, n_aux + 1), size)}
            best = min(losses, key=losses.get)
            if losses[best] < threshold:
                return best
        return tuple(range(1, n_aux + 1))
    chosen: tuple[int, ...] = ()
    while _loss(j_all, phi0, sigma, chosen) >= threshold and len(chosen) < n_aux:
        rest = [k for k in range(1, n_aux + 1) if k not in chosen]
        chosen = tuple(sorted(min((chosen + (k,) for k in rest), key=lambda s: _loss(j_all, phi0, sigma, s))))
    return chosen


def _widest_paths(q: torch.Tensor, d: torch.Tensor) -> list[int]:
    """Predecessor of each variable on its widest path from x (0) in the graph with edge weights
    |Q_ij| + |D_ij| (the path whose weakest link is strongest; -1 for x and unreachable ones)."""
    w = (q.abs() + d.abs()).tolist()
    n = len(w)
    width, pred, done = [0.0] * n, [-1] * n, [False] * n
    width[0] = float("inf")
    for _ in range(n):  # Dijkstra on the bottleneck width (n <= ~10 variables)
        u = max((i for i in range(n) if not done[i]), key=lambda i: width[i])
        done[u] = True
        for v in range(n):
            if not done[v] and v != u and min(width[u], w[u][v]) > width[v]:
                width[v], pred[v] = min(width[u], w[u][v]), u
    return pred


def _with_bridges(effective: tuple[int, ...], q: torch.Tensor, d: torch.Tensor) -> tuple[int, ...]:
    """``effective`` closed under bridges: an auxiliary that matters and reaches x through others
    brings them (the auxiliaries on its widest path to x), since its information flows through them."""
    pred = _widest_paths(q, d)
    keep = set(effective)
    for k in effective:
        while pred[k] > 0:
            k = pred[k]
            keep.add(k)
    return tuple(sorted(keep))


def _var(i: int) -> str:
    return "x" if i == 0 else f"v{i}"


def _name(mask: torch.Tensor, keep: list[int], patterns: dict, order: tuple[str, ...], generic) -> str:
    """The first pattern of ``order`` whose generic mask on the kept variables equals ``mask``;
    otherwise its entries by variable name, e.g. "{x-v1,v2-v3}" (Q) or "{v1,v2}" (a diagonal D)."""
    n = mask.shape[0]
    for name in order:
        if torch.equal(generic(patterns[name](n)), mask):
            return name
    pairs = [(i, j) for i in range(n) for j in range(i, n) if bool(mask[i, j])]
    return "{" + ",".join(_var(keep[i]) if i == j else f"{_var(keep[i])}-{_var(keep[j])}" for i, j in pairs) + "}"


def _d_of_factor(low: torch.Tensor) -> torch.Tensor:
    """Which entries of D = L L^T are nonzero for generic values of a lower mask ``low``."""
    l = low.to(_DT)
    return (l @ l.T) != 0


def _effective_masks(q, d, keep: list[int], rel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict upper mask of Q and symmetric mask of D on ``keep``: entries >= rel x the largest,
    plus the links of each kept auxiliary's widest path to x (the larger of |Q_ij|, |D_ij|), so
    that the way its information reaches x is always part of the effective structure."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    qs, ds = q[idx][:, idx], d[idx][:, idx]
    scale = float(torch.cat([qs.abs().flatten(), ds.abs().flatten()]).max())
    cut = rel * scale if scale > 0 else float("inf")
    q_mask, d_mask = torch.triu(qs.abs() >= cut, diagonal=1), ds.abs() >= cut
    pred, pos = _widest_paths(q, d), {v: i for i, v in enumerate(keep)}
    for k in keep[1:]:
        a, b = sorted((pos[k], pos[pred[k]]))  # (pred[k] is kept: the set is closed under bridges)
        if abs(float(q[k, pred[k]])) >= abs(float(d[k, pred[k]])):
            q_mask[a, b] = True
        else:
            d_mask[a, b] = d_mask[b, a] = True
    return q_mask, d_mask


def coupling(q, d, *, s_inf=None, gamma: float = 0.01, big_b, threshold: float = THRESHOLD,
             entry_threshold: float = ENTRY_THRESHOLD) -> Coupling:
    """The :class:`Coupling` of concrete Q [n, n] (skew) and D [n, n] (PSD) with stationary
    variances ``s_inf`` [n] (default 1), v_0 variance ``gamma``, measured at B(t) = ``big_b`` [N]
    (e.g. ``schedule.integral(time_grid())``).  All float64."""
    q = torch.as_tensor(q, dtype=_DT).detach().cpu()
    d = torch.as_tensor(d, dtype=_DT).detach().cpu()
    n = q.shape[0]
    s_inf = torch.ones(n, dtype=_DT) if s_inf is None else torch.as_tensor(s_inf, dtype=_DT).detach().cpu()
    phi0, sigma = _kernel_given_x(q, d, s_inf, float(gamma), torch.as_tensor(big_b, dtype=_DT).cpu())
    everything = list(range(n))
    j_all = precision(phi0, sigma, everything)  # [N]
    share = _loss(j_all, phi0, sigma, ()) if n > 1 else 0.0
    unique = tuple(_loss(j_all, phi0, sigma, tuple(i for i in everything[1:] if i != k)) for k in everything[1:])
    effective = _with_bridges(_smallest_set(j_all, phi0, sigma, n - 1, threshold), q, d) if n > 1 else ()
    keep = [0, *effective]
    q_mask, d_mask = _effective_masks(q, d, keep, entry_threshold)
    q_name = _name(q_mask, keep, Q_PATTERNS, _Q_ORDER, lambda m: torch.triu(m, diagonal=1))
    d_name = _name(d_mask, keep, D_PATTERNS, _D_ORDER, _d_of_factor)
    as_tuple = lambda m: tuple(tuple(int(v) for v in row) for row in m.tolist())  # noqa: E731
    return Coupling(n_aux=n - 1, share=share, unique=unique, effective=tuple(int(k) for k in effective),
                    q_pattern=q_name, d_pattern=d_name, q_mask=as_tuple(q_mask), d_mask=as_tuple(d_mask),
                    d_xx=float(d[0, 0]), threshold=threshold)


def process_coupling(process, q=None, d=None, **kwargs) -> Coupling:
    """The :class:`Coupling` of a :class:`~mdmsearch.diffusion.process.LinearMDM` on the fixed grid
    :func:`time_grid` of [T_MIN, T] (its schedule, S_inf and gamma); ``q``, ``d``: other values of
    its matrices (e.g. the EMA ones) instead of its current Q and D."""
    t = time_grid(process.T)
    big_b = process.schedule.integral(t)  # [N_T]
    q = process.Q if q is None else q
    d = process.D if d is None else d
    return coupling(q, d, s_inf=process.s_inf, gamma=process.gamma, big_b=big_b, **kwargs)
