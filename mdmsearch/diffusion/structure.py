"""Sparsity structures of Q and D, their validity check and hashing (math note, section 6)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Q_PATTERNS",
    "D_PATTERNS",
    "q_pattern",
    "d_pattern",
    "StructureCheck",
    "check_matrices",
    "check_structure",
    "stable_hash",
]

_DT = torch.float64

# Named sparsity patterns.  Variable 0 is the data x, 1..K the auxiliaries.
# Q patterns give the allowed strictly-upper entries of U (Q = U - U^T).
Q_PATTERNS: dict[str, Callable[[int], torch.Tensor]] = {
    "full": lambda n: torch.triu(torch.ones(n, n, dtype=torch.bool), 1),
    "chain": lambda n: torch.diag(torch.ones(n - 1, dtype=torch.bool), 1) if n > 1 else torch.zeros(1, 1, dtype=torch.bool),
    "none": lambda n: torch.zeros(n, n, dtype=torch.bool),
}
# D patterns give the allowed lower-triangular entries of L (D = L L^T) or the diagonal.
D_PATTERNS: dict[str, Callable[[int], torch.Tensor]] = {
    "full": lambda n: torch.tril(torch.ones(n, n, dtype=torch.bool)),
    "diag": lambda n: torch.eye(n, dtype=torch.bool),
    "chain": lambda n: torch.eye(n, dtype=torch.bool) | torch.diag(torch.ones(n - 1, dtype=torch.bool), -1),
    # noise enters the auxiliaries only (CLD/MALDA-like): full L on the aux block, x row zero
    "aux": lambda n: torch.tril(torch.ones(n, n, dtype=torch.bool)) & _not_x(n),
    # noise enters only through the last auxiliary (ALDA-like)
    "last": lambda n: _single(n, n - 1),
}


def _not_x(n: int) -> torch.Tensor:
    m = torch.ones(n, n, dtype=torch.bool)
    m[0, :] = False
    m[:, 0] = False
    return m


def _single(n: int, i: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    m[i, i] = True
    return m


def q_pattern(name: str, n: int) -> torch.Tensor:
    if name not in Q_PATTERNS:
        raise ValueError(f"unknown Q pattern {name!r}; available: {sorted(Q_PATTERNS)}")
    return Q_PATTERNS[name](n)


def d_pattern(name: str, n: int) -> torch.Tensor:
    if name not in D_PATTERNS:
        raise ValueError(f"unknown D pattern {name!r}; available: {sorted(D_PATTERNS)}")
    return D_PATTERNS[name](n)


@dataclass(frozen=True)
class StructureCheck:
    valid: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.valid


def _controllability_rank(a: torch.Tensor, g: torch.Tensor) -> int:
    n = a.shape[0]
    blocks, cur = [], g
    for _ in range(n):
        blocks.append(cur)
        cur = a @ cur
    ctrb = torch.cat(blocks, dim=1)  # [n, n*n]
    return int(torch.linalg.matrix_rank(ctrb, rtol=1e-9))


def check_matrices(q: torch.Tensor, d: torch.Tensor, s_inf: torch.Tensor | None = None) -> StructureCheck:
    """Check concrete Q, D: (A, D^{1/2}) controllable and A = -(Q + D) S_inf^{-1} Hurwitz."""
    q, d = q.detach().to(_DT), d.detach().to(_DT)
    n = q.shape[0]
    s_inf = torch.ones(n, dtype=_DT) if s_inf is None else s_inf.detach().to(_DT)
    a = -(q + d) / s_inf  # column j divided by s_j: (Q + D) S^{-1}
    evals, evecs = torch.linalg.eigh(d)
    g = evecs * evals.clamp_min(0).sqrt()
    rank = _controllability_rank(a, g)
    if rank < n:
        return StructureCheck(False, f"noise cannot reach every variable: controllability rank {rank} < n = {n}")
    max_re = float(torch.linalg.eigvals(a).real.max())
    if not max_re < -1e-10:
        return StructureCheck(False, f"A is not Hurwitz (max real eigenvalue {max_re:.3g}): the process does not converge to the target")
    return StructureCheck(True)


def check_structure(
    n: int,
    q_mask: torch.Tensor,
    d_mask: torch.Tensor,
    d_param: str = "full",
    s_inf: torch.Tensor | None = None,
    draws: int = 3,
    seed: int = 0,
) -> StructureCheck:
    """Generic validity of a sparsity structure: valid if random values on its free entries
    give a controllable, Hurwitz process (controllability is generic: it holds for almost all
    values as soon as it holds for one)."""
    gen = torch.Generator().manual_seed(seed)
    q_mask = torch.triu(torch.as_tensor(q_mask, dtype=torch.bool) | torch.as_tensor(q_mask, dtype=torch.bool).T, 1)
    d_mask = torch.as_tensor(d_mask, dtype=torch.bool)
    if d_mask.dim() == 1:
        d_mask = torch.diag(d_mask)
    if d_param == "diag":
        d_mask = torch.diag(torch.diagonal(d_mask))
    else:
        d_mask = torch.tril(d_mask | d_mask.T)
    if not d_mask.any():
        return StructureCheck(False, "D has no free entry: no noise enters the process")
    last = StructureCheck(False, "no draw was checked")
    for _ in range(draws):
        u = torch.randn(n, n, generator=gen, dtype=_DT) * q_mask
        l = torch.randn(n, n, generator=gen, dtype=_DT) * d_mask
        if d_param == "diag":
            l = l.abs()
        last = check_matrices(u - u.T, l @ l.T, s_inf)
        if last.valid:
            return last
    return last


def stable_hash(obj) -> str:
    """Short sha256 of a JSON-normalized object (sorted keys, floats repr'd)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
