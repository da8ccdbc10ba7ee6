"""Named processes (math note, section 7) and learned structures, behind one registry.

Add a process in a few lines::

    @register_process("my_cld")
    def my_cld(**common):
        return fixed_process("my_cld", q=[[0, -2], [2, 0]], d=[[0, 0], [0, 1]], **common)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .params import CholeskyPSD, DiagPSD, FixedPSD, FixedSkew, SkewParam
from .process import LinearMDM
from .schedules import make_schedule
from .structure import d_pattern, q_pattern

__all__ = [
    "PROCESSES",
    "register_process",
    "available_processes",
    "fixed_processes",
    "preset",
    "learned",
    "fixed_process",
    "common_kwargs",
]

_DT = torch.float64
PROCESSES: dict[str, Callable[..., LinearMDM]] = {}

# Defaults of the hyperparameters every process shares (math note: beta_0 = 0.1,
# beta_1 = 10, gamma = 0.01, S_inf = I, T = 1).
COMMON_DEFAULTS = dict(schedule="linear", beta_0=0.1, beta_1=10.0, beta=None, gamma=0.01, s_x2=1.0, s_v2=1.0, T=1.0)


def register_process(name: str):
    def deco(fn):
        PROCESSES[name] = fn
        return fn

    return deco


def available_processes() -> list[str]:
    return sorted(PROCESSES)


def fixed_processes() -> list[str]:
    """The registered processes with fixed Q, D (everything but "learned")."""
    return [p for p in available_processes() if p != "learned"]


def common_kwargs(n: int, kwargs: dict) -> dict:
    """Split the shared hyperparameters into LinearMDM keyword arguments."""
    unknown = set(kwargs) - set(COMMON_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown process option(s): {sorted(unknown)}; allowed: {sorted(COMMON_DEFAULTS)}")
    cfg = {**COMMON_DEFAULTS, **kwargs}
    if cfg["schedule"] == "constant":
        schedule = make_schedule("constant", beta=cfg["beta"] if cfg["beta"] is not None else 4.0)
    else:
        schedule = make_schedule(cfg["schedule"], beta_0=cfg["beta_0"], beta_1=cfg["beta_1"])
    s_inf = torch.tensor([cfg["s_x2"]] + [cfg["s_v2"]] * (n - 1), dtype=_DT)
    return dict(schedule=schedule, s_inf=s_inf, gamma=cfg["gamma"], T=cfg["T"])


def fixed_process(name: str, q, d, **common) -> LinearMDM:
    q = torch.as_tensor(q, dtype=_DT)
    return LinearMDM(FixedSkew(q), FixedPSD(torch.as_tensor(d, dtype=_DT)), name=name, d_param="fixed", **common_kwargs(q.shape[0], common))


def preset(name: str, **overrides) -> LinearMDM:
    """A named process with the math note's defaults; ``overrides`` change constants,
    e.g. ``preset("cld", beta_1=4.0, gamma=0.04)``."""
    key = name.lower()
    if key not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; available: {available_processes()}")
    return PROCESSES[key](**overrides)


@register_process("vpsde")
def vpsde(**common) -> LinearMDM:
    """VPSDE: n = 1, Q = 0, D = 1/2 -> dz = -beta z / 2 dt + sqrt(beta) dW."""
    return fixed_process("vpsde", q=[[0.0]], d=[[0.5]], **common)


@register_process("cld")
def cld(**common) -> LinearMDM:
    """Critically damped Langevin: Q = [[0,-1],[1,0]], D = diag(0, 2 sqrt(m)), m = s_v^2."""
    m = common.get("s_v2", COMMON_DEFAULTS["s_v2"])
    return fixed_process("cld", q=[[0.0, -1.0], [1.0, 0.0]], d=[[0.0, 0.0], [0.0, 2.0 * math.sqrt(m)]], **common)


@register_process("alda")
def alda(*, g: float = 1.0, p: float = 1.0, **common) -> LinearMDM:
    """ALDA: Q = [[0,-1/l,0],[1/l,0,-g],[0,g,0]], D = diag(0, 0, p/l), l = 1/s_v^2."""
    l = 1.0 / common.get("s_v2", COMMON_DEFAULTS["s_v2"])
    q = [[0.0, -1.0 / l, 0.0], [1.0 / l, 0.0, -g], [0.0, g, 0.0]]
    d = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, p / l]]
    return fixed_process("alda", q=q, d=d, **common)


@register_process("malda")
def malda(**common) -> LinearMDM:
    """MALDA: Q = -1 above the diagonal, +1 below; D = diag(0, 2 sqrt(m), 2 sqrt(m))."""
    m = common.get("s_v2", COMMON_DEFAULTS["s_v2"])
    q = [[0.0, -1.0, -1.0], [1.0, 0.0, -1.0], [1.0, 1.0, 0.0]]
    c = 2.0 * math.sqrt(m)
    return fixed_process("malda", q=q, d=[[0.0, 0.0, 0.0], [0.0, c, 0.0], [0.0, 0.0, c]], **common)


def _mask(spec, n: int, patterns: Callable[[str, int], torch.Tensor]) -> torch.Tensor | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return patterns(spec, n)
    return torch.as_tensor(spec, dtype=torch.bool)


@register_process("learned")
def learned(
    n_aux: int = 1,
    q_mask=None,
    d_mask=None,
    *,
    d_param: str = "full",
    q_init: float = -1.0,
    d_init: float = 1.0,
    init: str | None = None,
    init_noise: float = 0.0,
    seed: int | None = None,
    **common,
) -> LinearMDM:
    """A learnable process with K = ``n_aux`` auxiliary variables.

    q_mask / d_mask: boolean n x n matrices or pattern names (``Q_PATTERNS`` /
    ``D_PATTERNS``); None means full.  d_param: "full" (D = L L^T) or "diag"
    (D = diag(softplus(d))).  Initialization: U = q_init on free entries (MALDA-like for
    -1), D = d_init on the free diagonal, plus optional Gaussian ``init_noise``.
    ``init`` names a preset with the same n (e.g. "cld" for K = 1, "malda" for K = 2): Q and D
    start at its matrices instead (its nonzeros must be free under the masks).  A zero
    diagonal entry of a full-Cholesky D is a stationary point of D = L L^T (dD_ii/dL_ii =
    2 L_ii), so e.g. CLD's noiseless x stays noiseless unless ``init_noise`` perturbs it.
    """
    n_aux = int(n_aux)
    if n_aux < 0:
        raise ValueError(f"n_aux must be >= 0, got {n_aux}")
    n = n_aux + 1
    qm = _mask(q_mask, n, q_pattern)
    dm = _mask(d_mask, n, d_pattern)
    if d_param not in ("full", "diag"):
        raise ValueError(f"d_param must be 'full' or 'diag', got {d_param!r}")
    if init is not None:
        q_start, d_start = _preset_start(init, n, qm, dm, d_param, common)
    else:
        q_start, d_start = q_init, d_init
    q_mod = SkewParam(n, qm, init=q_start)
    if d_param == "full":
        d_mod = CholeskyPSD(n, dm, init=d_start)
    else:
        d_mod = DiagPSD(n, _diag_mask(dm), init=d_start)
    if init_noise > 0:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        with torch.no_grad():
            for p in (*q_mod.parameters(), *d_mod.parameters()):
                p.add_(init_noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return LinearMDM(q_mod, d_mod, name="learned", d_param=d_param, **common_kwargs(n, common))


def _diag_mask(dm: torch.Tensor | None) -> torch.Tensor | None:
    """A D mask as the 1-D mask of its diagonal (what a diagonal D can use)."""
    return None if dm is None else torch.diagonal(dm) if dm.dim() == 2 else dm


def _lower_factor(d: torch.Tensor) -> torch.Tensor:
    """A lower-triangular L with L L^T = D for any PSD D (singular too).

    With S = sqrt(D) (symmetric) and S = Q R: D = S^T S = R^T R, so L = R^T; rows are
    sign-flipped so the diagonal is >= 0.
    """
    from .params import psd_sqrt

    _, r = torch.linalg.qr(psd_sqrt(d))
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(d.dtype)
    return (sign[:, None] * r).T


def _preset_start(name: str, n: int, qm, dm, d_param: str, common: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial U (upper part of Q) and D-parameter of a learned process started at preset ``name``."""
    if name.lower() not in fixed_processes():
        raise ValueError(f"init must name a fixed process; available: {fixed_processes()}")
    ref = preset(name, **common)
    if ref.n != n:
        raise ValueError(f"init={name!r} has {ref.n - 1} auxiliary variable(s); this process has {n - 1}")
    q, d = ref.Q.detach(), ref.D.detach()  # [n, n] float64
    u = torch.triu(q, diagonal=1)
    if qm is not None and bool(((u != 0) & ~torch.triu(qm | qm.T, diagonal=1)).any()):
        raise ValueError(f"init={name!r}: Q has nonzero entries outside q_mask")
    if d_param == "diag":
        if not torch.equal(d, torch.diag(torch.diagonal(d))):
            raise ValueError(f"init={name!r}: D is not diagonal, use d_param='full'")
        free = torch.ones(n, dtype=torch.bool) if dm is None else _diag_mask(dm)
        if bool(((torch.diagonal(d) != 0) & ~free).any()):
            raise ValueError(f"init={name!r}: D has nonzero entries outside d_mask")
        return u, torch.diagonal(d)
    low = _lower_factor(d)
    if dm is not None and bool(((low.abs() > 1e-12) & ~torch.tril(dm | dm.T)).any()):
        raise ValueError(f"init={name!r}: D's Cholesky factor has nonzero entries outside d_mask")
    return u, low
