"""Paired comparisons of finished runs: differences in BPD with a standard error that means
something, and a verdict.

Every run evaluates the same held-out examples (validation and test splits of one data
configuration) with the same evaluation seed, i.e. the same dequantization noise and time
strata (common random numbers; ``training.evaluate.evaluate_bpd``), and writes its
per-example BPDs to ``per_example.parquet``.  Two configurations are compared example by
example: their difference has a much smaller variance than either BPD, so a real 0.01 bpd
gap is told apart from evaluation noise.

Replicates are distinct training seeds only: a seed that ran twice (e.g. in two studies)
counts once.  A configuration's per-example BPD is the mean over its seeds; the paired SE
is the evaluation noise of that mean difference, std(diff_i) / sqrt(n_examples).  The spread
over seeds (training noise) is reported separately, as the ``std`` of the leaderboard.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

log = logging.getLogger(__name__)

PER_EXAMPLE_FILE = "per_example.parquet"
SPLITS = ("val", "test")
TIE = "tie within noise"


@dataclass(frozen=True)
class Comparison:
    """a minus b in bits per dimension (negative: a is better)."""

    diff: float
    se: float
    n: int

    @property
    def verdict(self) -> str:
        return verdict(self.diff, self.se)

    def describe(self) -> str:
        return f"{self.diff:+.4f} ± {self.se:.4f} bpd (paired SE, {self.n} examples): {self.verdict}"


def verdict(diff: float, se: float) -> str:
    """'better' (lower BPD) or 'worse' when |diff| > 2 paired SE, else 'tie within noise'."""
    if not (math.isfinite(diff) and math.isfinite(se)) or abs(diff) <= 2.0 * se:
        return TIE
    return "better" if diff < 0 else "worse"


def read_per_example(run_dir: str | Path) -> Optional[np.ndarray]:
    """Held-out per-example BPDs of a run (validation then test, in example order), or None
    when the run has no readable file (an older run, or one that did not finish)."""
    import pandas as pd

    path = Path(run_dir) / PER_EXAMPLE_FILE
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on damage
        log.warning("skipping unreadable %s: %s", path, exc)
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
