"""What a report shows, computed from the Parquet leaderboard tree (pandas only, no plotting).

Configurations are aggregated over training seeds: the leaderboard's ``config_hash`` includes
the seed (it is the dedupe key), so the report groups rows by everything that defines a
configuration *except* the seed (:data:`GROUP_COLS`) and reports mean ± std and n over seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..compare import ALPHA, TIE, StructureComparison, distinct_seeds, level_text
from ..leaderboard import TIERS, config_label, confirmed_baselines, distinct_labels, verdict_interval, margins, tier_of
from ..errors import MDMError

log = logging.getLogger(__name__)

BASELINES = ("vpsde", "cld", "alda", "malda")
STATES = ("COMPLETE", "PRUNED", "FAIL", "INVALID", "DUPLICATE")
# Everything that makes two trials the same configuration up to the training seed.  spec_hash
# pins the data, model and budget (it also includes the study name, so studies never merge).
GROUP_COLS = ("spec_hash", "baseline", "n_aux", "q_pattern", "d_pattern", "d_param", "learn", "q_mask",
              "d_mask", "lr", "process_lr", "gamma", "beta_1", "time_sampler", "parameterization", "residual_stats")
STRUCTURE_PARAMS = ("n_aux", "q_pattern", "d_pattern", "d_param", "learn", "seed")

# display precision (the tests parse the table back with the same rounding)
BPD_DECIMALS = 3
SECONDS_DECIMALS = 1


def curves_root_for(root: str | Path) -> Path:
    """The learning-curve tree that sits next to a leaderboard tree (``<root>-curves``)."""
    root = Path(root)
    return root.parent / (root.name + "-curves")


def datasets_in(root: str | Path) -> list[str]:
    """Datasets with at least one leaderboard row under ``root`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.glob("dataset=*")):
        if d.is_dir() and any(d.rglob("*.parquet")):
            out.append(d.name[len("dataset="):])
    return out


def load_rows(root: str | Path, dataset: str):
    """The dataset's leaderboard rows; MDMError (one line) when there are none."""
    from ..leaderboard import read_tree

    root = Path(root)
    if not root.is_dir():
        raise MDMError(f"no leaderboard at {root}; run `mdmsearch run SPEC.yaml` first (or pass --root)")
    have = datasets_in(root)
    if dataset not in have:
        avail = f"datasets with results: {', '.join(have)}" if have else "the leaderboard is empty"
        raise MDMError(f"no leaderboard results for dataset {dataset!r} under {root} ({avail})")
    df = read_tree(root, dataset)
    if df.empty:
        raise MDMError(f"no leaderboard results for dataset {dataset!r} under {root} (the leaderboard is empty)")
    df = df.sort_values(["study", "trial"]).reset_index(drop=True)
    return df


def load_curves(root: str | Path, dataset: str):
    """Learning curves of the dataset (columns study, trial, step, val_bpd, ...), or None."""
    from ..leaderboard import read_files

    target = curves_root_for(root) / f"dataset={dataset}"
    if not target.is_dir() or not any(target.rglob("*.parquet")):
        return None
    try:
        df = read_files(target, curves_root_for(root), "learning-curve")
    except MDMError:  # every curve file unreadable: the report notes missing curves
        return None
    return df.sort_values(["study", "trial", "step"]).reset_index(drop=True)


# ---------------------------------------------------------------------- helpers
def finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def text(v: Any) -> Optional[str]:
    """A string cell, or None for null/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def fmt_num(v: Any, decimals: int) -> str:
    return f"{float(v):.{decimals}f}" if finite(v) else "—"


def fmt_bpd(mean: Any, std: Any = None) -> str:
    """``5.588 ± 0.012`` (the ± part only when the std is defined, i.e. n > 1)."""
    if not finite(mean):
        return "—"
    s = fmt_num(mean, BPD_DECIMALS)
    if finite(std):
        s += f" ± {fmt_num(std, BPD_DECIMALS)}"
    return s


def parse_json(v: Any) -> Any:
    s = text(v)
    if not s:
        return None
    try:
        return json.loads(s)
    except ValueError:
        return None


def hyper_params(params_json: Any) -> dict[str, Any]:
    """The searched non-structure parameters of a row (lr, process_lr, ...)."""
    p = parse_json(params_json) or {}
    return {k: v for k, v in sorted(p.items()) if k not in STRUCTURE_PARAMS}


def fmt_hyper(h: dict[str, Any]) -> str:
    if not h:
        return "—"
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                     for k, v in h.items())


def structure_label(baseline: Any, n_aux: Any, q_pattern: Any, d_pattern: Any, d_param: Any = None,
                    learn: Any = True) -> str:
    """``VPSDE`` for a baseline, ``K=2, Q chain, D aux`` for a learned structure."""
    b = text(baseline)
    if b:
        return b.upper()
    k = int(n_aux) if finite(n_aux) else "?"
    d = f"D {text(d_pattern)}"
    dp = text(d_param)
    if dp and dp not in ("full", "fixed"):
        d += f" ({dp})"
    lab = f"K={k}, Q {text(q_pattern)}, {d}"
    if learn is False or (isinstance(learn, (bool,)) and not learn):
        lab += ", fixed init"
    return lab


def _group_key(row) -> str:
    vals = []
    for c in GROUP_COLS:
        v = row.get(c)
        if isinstance(v, float):
            v = None if math.isnan(v) else round(v, 12)
        elif v is not None and text(v) is None:
            v = None
        elif hasattr(v, "item"):
            v = v.item()
        vals.append(v)
    return hashlib.sha1(json.dumps(vals, default=str).encode()).hexdigest()[:10]


def add_group(df):
    """Adds ``group`` (configuration up to the seed) and ``label`` columns (copy)."""
    df = df.copy()
    df["group"] = [_group_key(r) for r in df.to_dict("records")] if len(df) else []
    # the leaderboard's label (structure + searched hyperparameters): one label per configuration
    df["label"] = distinct_labels([config_label(r) for r in df.to_dict("records")], df["group"]) if len(df) else []
    df["is_baseline"] = [text(b) is not None for b in df["baseline"]] if len(df) else []
    return df


# ---------------------------------------------------------------------- the table
@dataclass
class Entry:
    """One configuration (aggregated over seeds) or a baseline without a completed run."""

    label: str
    baseline: Optional[str]
    group: Optional[str]
    rank: Optional[int] = None  # among all completed configurations, by mean val BPD
    n_aux: Optional[int] = None
    q_pattern: Optional[str] = None
    d_pattern: Optional[str] = None
    hyper: dict = field(default_factory=dict)
    val_mean: float = float("nan")
    val_std: float = float("nan")
    test_mean: float = float("nan")
    test_std: float = float("nan")
    n: int = 0
    steps: Optional[int] = None
    train_seconds: float = float("nan")
    trials: list = field(default_factory=list)  # [(study, trial)] of the completed runs
    rep: Optional[dict] = None  # the best seed's leaderboard row
    status: str = ""  # "" when completed, else why there is no result
    artifact_dirs: list = field(default_factory=list)  # of the completed runs (one per seed)
    seeds: list = field(default_factory=list)  # the training seed of each artifact dir
    eff_n_aux: Optional[int] = None  # effective K over its seeds (report/effective.py, docs/math.md section 9)
    eff_structure: Optional[str] = None  # that seed's effective structure, e.g. "K=0 (x alone, D_xx=0.71)"
    vs_baseline: Optional[StructureComparison] = None  # held-out BPD minus the reference baseline's, over seeds
    margin_on: Optional[str] = None  # the runs and split of ``vs_baseline`` (leaderboard.margins)
    tier: str = TIERS[2]  # the ranking rule's tier (leaderboard.ranked): winner | raced | searched
    fresh: bool = False  # the numbers are over the confirmation's fresh seeds only
    search_runs: list = field(default_factory=list)  # [(seed, artifact dir)] of the search's seeds
    all_val_mean: float = float("nan")  # every seed, the selecting ones included
    all_n: int = 0

    @property
    def complete(self) -> bool:
        return self.n > 0 and finite(self.val_mean)

    @property
    def config(self) -> str:
        return self.group or "—"


def aggregate(df, confirmations: Optional[dict] = None, dataset: Optional[str] = None) -> list[Entry]:
    """Completed configurations ranked as the leaderboard ranks them (:func:`mdmsearch.leaderboard.ranked`):
    confirmed winners, then the configurations the confirmation raced (both over their fresh seeds
    only), then the others (over the search's seeds), each tier by mean validation BPD."""
    if "group" not in df.columns:
        df = add_group(df)
    ok = distinct_seeds(df[(df["state"] == "COMPLETE") & df["val_bpd"].notna()]).copy()  # replicates = distinct seeds
    ok["fresh"] = ok["confirm_round"].notna() if "confirm_round" in ok.columns else False
    entries = [_entry(part, confirmations or {}, dataset) for _, part in ok.groupby("group", sort=False)]
    entries.sort(key=lambda e: (TIERS.index(e.tier), e.val_mean, e.label))
    for i, e in enumerate(entries, 1):
        e.rank = i
    return entries


def _runs(part) -> list:
    if "artifact_dir" not in part or "seed" not in part:
        return []
    return [(int(sd), p) for sd, p in zip(part["seed"], part["artifact_dir"]) if text(p)]


def _entry(every, confirmations: dict, dataset: Optional[str]) -> Entry:
    """One configuration's entry: a raced one shows its fresh seeds, any other its search seeds."""
    fresh = bool(every["fresh"].any())
    part = every[every["fresh"]] if fresh else every
    rep = part.loc[part["val_bpd"].idxmin()].to_dict()
    val, test = part["val_bpd"].astype(float), part["test_bpd"].astype(float)
    group = text(rep.get("config_group"))
    return Entry(
        label=rep["label"], baseline=text(rep.get("baseline")), group=rep["group"],
        n_aux=int(rep["n_aux"]) if finite(rep.get("n_aux")) else None,
        q_pattern=text(rep.get("q_pattern")), d_pattern=text(rep.get("d_pattern")),
        hyper=hyper_params(rep.get("params")),
        val_mean=float(val.mean()), val_std=float(val.std()) if len(val) > 1 else float("nan"),
        test_mean=float(test.mean()) if test.notna().any() else float("nan"),
        test_std=float(test.std()) if test.notna().sum() > 1 else float("nan"),
        n=int(val.count()), steps=int(part["steps"].max()) if part["steps"].notna().any() else None,
        train_seconds=float(part["train_seconds"].mean()) if part["train_seconds"].notna().any() else float("nan"),
        trials=[(str(s), int(t)) for s, t in zip(part["study"], part["trial"])], rep=rep,
        artifact_dirs=[p for _, p in _runs(part)], seeds=[sd for sd, _ in _runs(part)],
        tier=tier_of(dataset if dataset is not None else text(rep.get("dataset")), group, fresh, confirmations),
        fresh=fresh, search_runs=_runs(every[~every["fresh"]]),
        all_val_mean=float(every["val_bpd"].astype(float).mean()), all_n=int(every["val_bpd"].count()))


def _baseline_status(rows) -> str:
    if rows.empty:
        return "not run in these studies"
    counts = rows["state"].value_counts()
    parts = []
    for state in STATES:
        if state in counts:
            parts.append(f"{counts[state]} {state.lower()}")
    reasons = [text(r) for r in rows["reason"] if text(r)]
    msg = "no completed run (" + ", ".join(parts) + ")"
    if reasons:
        msg += f": {reasons[0]}"
    return msg


@dataclass
class Table:
    rows: list[Entry]  # shown, in display order
    all_entries: list[Entry]
    best_learned: Optional[Entry]
    best_baseline: Optional[Entry]
    sentence: str
    headlines: list = field(default_factory=list)  # the confirmations' winner lines (search.confirm.headline)


def leaderboard_table(df, top: int = 5, confirmations: Optional[dict] = None, dataset: Optional[str] = None) -> Table:
    """Top ``top`` learned configurations plus every fixed baseline (always), in the leaderboard's
    order (:func:`aggregate`); baselines without a completed run come last with their status."""
    df = df if "group" in df.columns else add_group(df)
    entries = aggregate(df, confirmations, dataset)
    learned = [e for e in entries if not e.baseline]
    shown = learned[:max(0, int(top))]
    best_base: dict[str, Entry] = {}
    for e in entries:
        if e.baseline and e.baseline not in best_base:
            best_base[e.baseline] = e
    shown += list(best_base.values())
    # searched baselines in other orders still count; the four standard ones always appear
    missing = []
    for b in list(BASELINES) + sorted({text(x) for x in df["baseline"] if text(x)} - set(BASELINES)):
        if b in best_base:
            continue
        rows = df[df["baseline"] == b]
        missing.append(Entry(label=b.upper(), baseline=b, group=None, status=_baseline_status(rows)))
    shown.sort(key=lambda e: e.rank)
    shown += missing
    best_learned = learned[0] if learned else None
    reference = _reference(entries, confirmations or {}, dataset)
    ref_group = text((reference.rep or {}).get("config_group")) if reference else None
    confirmation = next((i for (ds, _), i in (confirmations or {}).items()
                         if ds == dataset and i["baseline"]["group"] == ref_group), None)
    compare_to_baseline(entries, reference, confirmation)
    confirmed = any(ds == dataset for ds, _ in (confirmations or {}))
    return Table(shown, entries, best_learned, reference, margin_sentence(best_learned, reference, confirmed))


def _reference(entries: list[Entry], confirmations: dict, dataset: Optional[str]) -> Optional[Entry]:
    """The baseline every margin is measured against: the confirmation's, else the best one."""
    baselines = [e for e in entries if e.baseline]
    confirmed = confirmed_baselines(dataset, confirmations) if dataset is not None else set()
    return next((e for e in baselines if text((e.rep or {}).get("config_group")) in confirmed),
                baselines[0] if baselines else None)


def compare_to_baseline(entries: list[Entry], baseline: Optional[Entry], confirmation: Optional[dict] = None) -> None:
    """Sets ``vs_baseline`` and ``margin_on`` of every completed entry (the baseline itself
    included: zero), by :func:`mdmsearch.leaderboard.margins`, the leaderboard's rule."""
    if baseline is None:
        return
    complete = [e for e in entries if e.complete]
    search = {e.group: e.search_runs for e in complete}
    fresh = {e.group: list(zip(e.seeds, e.artifact_dirs)) for e in complete if e.fresh}
    found = margins(search, fresh, baseline.group, set(fresh), confirmation)
    for e in complete:
        e.vs_baseline, e.margin_on = found.get(e.group, (None, None))


def fmt_comparison(c: Optional[StructureComparison]) -> str:
    """``-0.012 [-0.019, -0.005] (better, 3 seeds, P 0.92)`` (the 95% interval), ``-0.012 (not decided (1 seed))``, or ``—``
    without per-example results."""
    if c is None:
        return "—"
    d = BPD_DECIMALS
    if not c.decided:
        return f"{c.diff:+.{d}f} ({c.verdict})"
    return f"{c.diff:+.{d}f} [{_ci(c)}] ({c.verdict}, {c.n_seeds} seeds, P {c.p_better:.2f})"


def margin_sentence(learned: Optional[Entry], baseline: Optional[Entry], confirmed: bool = False) -> str:
    """The table's sentence: the first configuration of the ranking against the reference
    baseline.  ``confirmed``: it is a confirmed winner, whose numbers are its fresh seeds'."""
    d = BPD_DECIMALS
    if confirmed and learned is not None and learned.fresh and baseline is not None:
        c = learned.vs_baseline
        over = (f"{c.diff:+.{d}f} [{_ci(c)}] bpd, {c.verdict}" if c is not None and c.decided else
                f"{c.diff:+.{d}f} bpd, {c.verdict}" if c is not None else "no per-example results")
        return (f"Confirmed winner: {learned.label}, {learned.val_mean:.{d}f} validation bpd over {learned.n} fresh "
                f"seeds (over all {learned.all_n} seeds, including the one that selected it: "
                f"{learned.all_val_mean:.{d}f}); against {baseline.label} on the fresh seeds' test split: {over}.")
    if learned is None and baseline is None:
        return "No configuration has completed yet, so there is nothing to compare."
    if learned is None:
        return (f"No learned structure has completed yet; the best baseline ({baseline.label}) reaches "
                f"{baseline.val_mean:.{d}f} validation bpd.")
    if baseline is None:
        return (f"The best learned structure ({learned.label}) reaches {learned.val_mean:.{d}f} validation bpd; "
                f"no baseline has completed yet, so there is no margin to report.")
    margin = baseline.val_mean - learned.val_mean
    if round(abs(margin), d) == 0:
        rel = f"level with the best baseline ({baseline.label}, {baseline.val_mean:.{d}f})"
    else:
        word = "lower" if margin > 0 else "higher"
        rel = f"{abs(margin):.{d}f} bpd {word} than the best baseline ({baseline.label}, {baseline.val_mean:.{d}f})"
    sentence = f"The best learned structure ({learned.label}) reaches {learned.val_mean:.{d}f} validation bpd, {rel}."
    c = learned.vs_baseline
    if c is None:
        return sentence + " (No per-example results to compare: the difference has no standard error.)"
    if not c.decided:
        return (sentence + f" As a structure it is not decided: {c.seeds_text()} (a verdict needs at least 2 "
                f"seeds each; `mdmsearch confirm` trains more).")
    judged = ("a tie within noise" if c.verdict == TIE else
              f"{'better' if c.diff < 0 else 'worse'} as a structure (t test over seeds, {c.df:.0f} df)")
    return (sentence + f" Over seeds ({c.seeds_text()}), its held-out difference to the baseline is "
            f"{c.diff:+.{d}f} [{_ci(c)}] bpd (SE {c.se:.{d}f}) with P(better) = {c.p_better:.2f}: {judged}.")


def _ci(c: StructureComparison) -> str:
    """``-0.019, -0.005`` (95%), or ``-0.021, -0.003; 96.6% CI`` at a race's look's level."""
    lo, hi = verdict_interval(c)
    level = "" if c.alpha == ALPHA else f"; {level_text(c.alpha)}"
    return f"{lo:+.{BPD_DECIMALS}f}, {hi:+.{BPD_DECIMALS}f}{level}"


# ---------------------------------------------------------------------- other views
def state_counts(df) -> dict[str, int]:
    counts = {str(k): int(v) for k, v in df["state"].value_counts().items()}
    order = [s for s in STATES if s in counts] + sorted(set(counts) - set(STATES))
    return {s: counts[s] for s in order}


def anytime(df):
    """Per study: trial rows with elapsed wall time (seconds since the study's first start) and
    the best-so-far completed validation BPD, both in trial order and in finishing order.  Search
    trials only: a confirmation trial (a fresh seed of a configuration already found) is no
    search progress."""
    import pandas as pd

    out = []
    if "confirm_round" in df.columns:
        df = df[df["confirm_round"].isna()]
    for study, part in df.groupby("study", sort=True):
        part = part.sort_values("trial").copy()
        ok = (part["state"] == "COMPLETE") & part["val_bpd"].notna()
        comp = part["val_bpd"].where(ok)
        part["best_by_trial"] = comp.cummin().ffill()
        elapsed = None
        if part["finished_at"].notna().any():
            t0 = part["started_at"].min() if part["started_at"].notna().any() else part["finished_at"].min()
            elapsed = (part["finished_at"] - t0).dt.total_seconds()
        if elapsed is None or elapsed.isna().all():
            # no timestamps: trials back to back in trial order
            elapsed = part["wall_seconds"].fillna(0).cumsum()
        part["elapsed"] = elapsed.astype(float)
        by_time = part.sort_values("elapsed")
        part["best_by_time"] = by_time["val_bpd"].where(ok.loc[by_time.index]).cummin().ffill().reindex(part.index)
        out.append(part)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def provenance(df, studies: dict[str, dict]) -> dict:
    """Studies (name, rows by state, spec hashes), versions and time span of the results."""
    import pandas as pd

    out_studies = []
    for study, part in df.groupby("study", sort=True):
        info = studies.get(study, {})
        out_studies.append({
            "study": study, "rows": int(len(part)), "states": state_counts(part),
            "spec_hashes": sorted({text(h) for h in part["spec_hash"] if text(h)}),
            "study_spec_hash": info.get("spec_hash"), "created_at": info.get("created_at"),
            "storage": info.get("storage"), "storage_note": info.get("note"),
            "first_started": _ts(part["started_at"].min()), "last_finished": _ts(part["finished_at"].max()),
            "executors": sorted({text(x) for x in part["executor"] if text(x)}),
        })
    versions = {}
    for col, name in (("mdmsearch_version", "mdmsearch"), ("torch_version", "torch"), ("optuna_version", "optuna")):
        versions[name] = sorted({text(v) for v in df[col] if text(v)}) if col in df.columns else []
    return {"studies": out_studies, "versions": versions, "rows": int(len(df)),
            "schema_versions": sorted({int(v) for v in df["schema_version"].dropna()})
            if "schema_version" in df.columns else [], "pandas": pd.__version__}


def _ts(v) -> Optional[str]:
    if text(v) is None:
        return None
    try:
        return v.strftime("%Y-%m-%d %H:%M:%S UTC")
    except (AttributeError, ValueError):
        return str(v)
