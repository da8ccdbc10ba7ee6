"""Comparisons of finished runs, of two kinds that are never mixed up.

* A **model** comparison (:func:`paired`, :class:`Comparison`): one trained run each, paired by
  held-out example.  Every run evaluates the same examples with the same evaluation seed
  (common random numbers; ``training.evaluate.evaluate_bpd``), so the difference has a small
  *evaluation* standard error, std(diff_i) / sqrt(n_examples).  It says "this checkpoint is
  better on these examples"; it knows nothing of training noise.
* A **structure** comparison (:func:`compare_structures`, :class:`StructureComparison`): two
  configurations, each trained with >= 2 distinct seeds.  A seed shifts a whole run's BPD by
  several times the evaluation SE, so the unit of replication is the seed: each run is reduced
  to its mean held-out BPD, and the difference of the configurations' means gets a t test over
  seeds (paired by seed when both ran the same seeds, else Welch's), with the t distribution's
  few degrees of freedom.  It also gives the probability of outperforming, P(A < B) over seeds.
  With one seed on either side it is "not decided": a one-seed "better" says nothing about a
  structure.  Derivation and calibration: docs/comparisons.md.

Replicates are distinct training seeds only: a seed that ran twice (e.g. in two studies)
counts once.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

PER_EXAMPLE_FILE = "per_example.parquet"
SPLITS = ("val", "test")
HELDOUT = "heldout"  # read_per_example's default: both SPLITS, validation then test
TIE = "tie within noise"
NOT_DECIDED = "not decided"
ALPHA = 0.05  # two-sided level of the structure verdict's t test
# A difference of means no larger than this many units in the last place of the BPDs compared is
# float rounding (means summed in another order), never a verdict.
ROUNDING_ULPS = 64


@dataclass(frozen=True)
class Comparison:
    """A model comparison: a minus b in bits per dimension (negative: a is better), paired by
    example; ``se`` is evaluation noise only."""

    kind = "model"

    diff: float
    se: float
    n: int

    @property
    def verdict(self) -> str:
        return verdict(self.diff, self.se)

    def describe(self) -> str:
        return f"{self.diff:+.4f} ± {self.se:.4f} bpd (paired SE, {self.n} examples): {self.verdict}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "diff": self.diff, "se": self.se, "n_examples": self.n, "verdict": self.verdict}


def verdict(diff: float, se: float) -> str:
    """'better' (lower BPD) or 'worse' when |diff| > 2 paired SE, else 'tie within noise'."""
    if not (math.isfinite(diff) and math.isfinite(se)) or abs(diff) <= 2.0 * se:
        return TIE
    return "better" if diff < 0 else "worse"


def read_per_example(run_dir: str | Path, split: str = HELDOUT) -> Optional[np.ndarray]:
    """Held-out per-example BPDs of a run (validation then test, in example order; ``split``
    "val" or "test": that split only), or None when the run has no readable file (an older
    run, or one that did not finish) or no example of ``split``."""
    import pandas as pd

    if split != HELDOUT and split not in SPLITS:
        raise ValueError(f"split must be {HELDOUT!r} or one of {SPLITS}, got {split!r}")

    path = Path(run_dir) / PER_EXAMPLE_FILE
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on damage
        log.warning("skipping unreadable %s: %s", path, exc)
        return None
    if split != HELDOUT:
        df = df[df["split"] == split]
        if df.empty:
            return None
    order = {s: i for i, s in enumerate(SPLITS)}
    df = df.assign(_order=df["split"].map(order)).sort_values(["_order", "index"])
    return df["bpd"].to_numpy(dtype=np.float64)


def seed_mean(runs: Iterable[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """Per-example mean over the runs (seeds) that have results of one common length."""
    arrays = [r for r in runs if r is not None]
    if not arrays or len({a.shape for a in arrays}) != 1:
        return None
    return np.mean(np.stack(arrays), axis=0)


def paired(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[Comparison]:
    """a - b paired by example; None when either is missing or they cover different examples."""
    if a is None or b is None or a.shape != b.shape or a.size < 2:
        return None
    diff = a - b
    return Comparison(diff=float(diff.mean()), se=float(diff.std(ddof=1) / math.sqrt(diff.size)), n=int(diff.size))


def distinct_seeds(df, order_by: str = "trial"):
    """One row per (configuration group, seed): a seed run twice is one replicate.  ``df`` needs
    ``group`` and ``seed`` columns; the earliest row (by ``order_by``) is kept."""
    if df.empty or "seed" not in df.columns:
        return df
    return df.sort_values(order_by).drop_duplicates(subset=["group", "seed"], keep="first")


# ---------------------------------------------------------------------- structure comparisons
@functools.lru_cache(maxsize=4096)
def level_text(alpha: float) -> str:
    """``96.6% CI``: the one spelling of an interval's confidence level, in every view."""
    return f"{100 * (1 - alpha):.1f}% CI"


def t_quantile(q: float, df: float) -> float:
    """The t distribution's q quantile with df degrees of freedom (cached: a simulated race asks
    the same few quantiles millions of times)."""
    return float(stats.t.ppf(q, df))


@dataclass(frozen=True)
class StructureComparison:
    """A structure comparison: configuration A minus configuration B, mean held-out BPD over
    seeds (negative: A is better).  ``se`` includes the spread over seeds; ``df`` is the t
    distribution's degrees of freedom (NaN: not decided); ``p_better`` is P(A < B) over seeds."""

    kind = "structure"

    diff: float
    se: float
    df: float
    n_a: int
    n_b: int
    p_better: float
    paired_by_seed: bool
    n_examples: int
    rounding: float = 0.0  # float rounding of the means compared (ROUNDING_ULPS ulps of their scale)
    alpha: float = ALPHA  # two-sided level of the verdict (a race's look may test at a smaller one)

    @property
    def n_seeds(self) -> int:
        """Seeds behind the weaker side (what decides how much the verdict can say)."""
        return min(self.n_a, self.n_b)

    @property
    def decided(self) -> bool:
        return math.isfinite(self.se) and math.isfinite(self.df)

    @property
    def threshold(self) -> float:
        """The margin |diff| must exceed: t_{1 - alpha/2, df} standard errors."""
        return self.half_width(self.alpha)

    def half_width(self, alpha: float = ALPHA) -> float:
        """Half-width of the two-sided 1 - alpha interval: t_{1 - alpha/2, df} * SE (NaN: not decided)."""
        return t_quantile(1 - alpha / 2, self.df) * self.se if self.decided else math.nan

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """The 1 - alpha confidence interval of the margin, diff ± t_{1 - alpha/2, df} SE; with the
        verdict's own ``alpha`` it excludes 0 exactly when the verdict is better or worse."""
        h = self.half_width(alpha)
        return (self.diff - h, self.diff + h)

    def ci_text(self) -> str:
        """``-0.0031 [-0.0306, +0.0244] bpd`` (the interval at the verdict's level, named when it is
        not 95%), or ``-0.0031 bpd (no interval: 1 seed)`` when not decided."""
        if not self.decided:
            return f"{self.diff:+.4f} bpd (no interval: {self.n_seeds} seed{'s' if self.n_seeds != 1 else ''})"
        lo, hi = self.interval(self.alpha)
        level = "" if self.alpha == ALPHA else f" ({level_text(self.alpha)})"
        return f"{self.diff:+.4f} [{lo:+.4f}, {hi:+.4f}] bpd{level}"

    @property
    def verdict(self) -> str:
        """'better', 'worse', 'tie within noise', or 'not decided (1 seed)'.  A difference within
        float rounding of the BPDs (``rounding``) is a tie whatever the spread: identical run sets,
        or per-seed differences that are all equal to zero, never decide."""
        if not self.decided:
            return f"{NOT_DECIDED} ({self.n_seeds} seed{'s' if self.n_seeds != 1 else ''})"
        if not math.isfinite(self.diff) or abs(self.diff) <= max(self.threshold, self.rounding):
            return TIE
        return "better" if self.diff < 0 else "worse"

    def seeds_text(self) -> str:
        how = "paired by seed" if self.paired_by_seed else "unpaired"
        return f"{self.n_a} vs {self.n_b} seeds, {how}"

    def describe(self) -> str:
        se = f", SE {self.se:.4f}" if self.decided else ""
        return (f"{self.ci_text()} ({self.seeds_text()}{se}; P(A<B) = {self.p_better:.2f}): {self.verdict}")

    def as_dict(self) -> dict:
        lo, hi = self.interval(self.alpha) if self.decided else (None, None)
        return {"kind": self.kind, "diff": self.diff, "se": self.se if self.decided else None,
                "df": self.df if self.decided else None, "n_seeds_a": self.n_a, "n_seeds_b": self.n_b,
                "paired_by_seed": self.paired_by_seed, "p_better": self.p_better, "n_examples": self.n_examples,
                "verdict": self.verdict, "alpha": self.alpha, "ci_low": lo, "ci_high": hi}


def run_means(runs: dict) -> dict:
    """{seed: mean held-out BPD} of the runs that have per-example results ({seed: array})."""
    return {int(seed): float(np.mean(arr)) for seed, arr in runs.items() if arr is not None and arr.size}


def compare_structures(a: dict, b: dict) -> Optional[StructureComparison]:
    """Configuration A minus configuration B over seeds; ``a``/``b`` map distinct training seeds
    to per-example held-out BPDs (:func:`read_per_example`).  None when either has no result or
    the runs cover different examples.

    Each run counts as one draw of its configuration's mean BPD; the example noise is inside
    each draw.  When both configurations ran exactly the same seeds (>= 2), the differences
    d_s = m_A,s - m_B,s are the replicates (same seed: same initial network draw and batch
    order where the shapes allow, so pairing removes that shared part): diff = mean(d),
    SE = sd(d) / sqrt(n), df = n - 1.  Otherwise Welch's t: SE = sqrt(s_A^2/n_A + s_B^2/n_B)
    with Welch-Satterthwaite df.  With one seed on either side: diff only, not decided."""
    arrays = [v for v in (*a.values(), *b.values()) if v is not None]
    if not arrays or len({x.shape for x in arrays}) != 1:
        return None
    ma, mb = run_means(a), run_means(b)
    if not ma or not mb:
        return None
    # seeds sorted and means summed exactly (fsum): the result does not depend on the order
    # in which the runs were given
    va = np.array([ma[s] for s in sorted(ma)])
    vb = np.array([mb[s] for s in sorted(mb)])
    n_examples = int(arrays[0].size)
    diff = math.fsum(va) / va.size - math.fsum(vb) / vb.size
    rounding = ROUNDING_ULPS * float(np.spacing(max(np.abs(va).max(), np.abs(vb).max())))
    p_better = _p_better(ma, mb)
    same = set(ma) == set(mb) and len(ma) >= 2
    if same:
        d = va - vb  # [n_seeds], paired by seed
        se = float(d.std(ddof=1) / math.sqrt(d.size))
        return StructureComparison(math.fsum(d) / d.size, se, float(d.size - 1), len(ma), len(mb), p_better, True,
                                   n_examples, rounding)
    if va.size < 2 or vb.size < 2:
        return StructureComparison(diff, math.nan, math.nan, va.size, vb.size, p_better, False, n_examples, rounding)
    qa, qb = va.var(ddof=1) / va.size, vb.var(ddof=1) / vb.size
    se = math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa ** 2 / (va.size - 1) + qb ** 2 / (vb.size - 1)) if qa + qb > 0 else math.inf
    return StructureComparison(diff, se, float(df), va.size, vb.size, p_better, False, n_examples, rounding)


def _p_better(ma: dict, mb: dict) -> float:
    """P(A < B) over seeds: the share of seeds (paired) or of seed pairs (unpaired) in which A's
    run has the lower mean BPD; ties count one half."""
    if set(ma) == set(mb) and len(ma) >= 2:
        pairs = [(ma[s], mb[s]) for s in ma]
    else:
        pairs = [(x, y) for x in ma.values() for y in mb.values()]
    wins = sum(1.0 if x < y else 0.5 if x == y else 0.0 for x, y in pairs)
    return wins / len(pairs)


def read_runs(runs: Iterable[tuple[int, str | Path]], split: str = HELDOUT) -> dict:
    """{seed: per-example BPDs} of (seed, run directory) pairs; the first run of a seed counts.
    ``split``: as in :func:`read_per_example`."""
    out: dict = {}
    for seed, run_dir in runs:
        if int(seed) not in out:
            out[int(seed)] = read_per_example(run_dir, split=split)
    return out


def vs_reference(groups: dict, reference) -> dict:
    """Every group's structure comparison against the group ``reference`` (e.g. the best
    baseline): ``groups`` maps a key to [(seed, run directory)], the result a key to a
    :class:`StructureComparison` or None.  The one place the leaderboard, the report and
    ``mdmsearch compare`` compute a margin."""
    runs = {key: read_runs(members) for key, members in groups.items()}
    ref = runs.get(reference)
    if ref is None:
        return {key: None for key in groups}
    return {key: compare_structures(r, ref) for key, r in runs.items()}
