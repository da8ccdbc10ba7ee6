"""Parquet leaderboards: one file per finished trial, atomically, in a Hive-partitioned tree

    <root>/dataset=<name>/study=<name>/trial-<n>.parquet      (one row, fixed schema)
    <curves_root>/dataset=<name>/study=<name>/trial-<n>.parquet (learning curve rows)

so that ``pandas.read_parquet(root)``, ``pyarrow.dataset`` and DuckDB read the whole tree
as one table (``dataset`` and ``study`` come from the partition directories).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .compare import ALPHA, compare_structures, distinct_seeds, read_runs, vs_reference
from .errors import MDMError
from .io import atomic_write

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 2: parameterization, residual_stats; 3: kid, kid_se, fid, quality; 4: confirm_round, confirm_role;
# 5: eff_n_aux, eff_structure, aux_share, coupling

# Column -> arrow type.  Every file has exactly this schema (missing values are null).
COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.int32(),
    "trial": pa.int64(),
    "state": pa.string(),  # COMPLETE | PRUNED | FAIL | INVALID | DUPLICATE
    "reason": pa.string(),
    "baseline": pa.string(),  # vpsde/cld/alda/malda, or null for searched structures
    "seed": pa.int64(),
    "process": pa.string(),  # process family: preset name or "learned"
    "n_aux": pa.int32(),
    "q_pattern": pa.string(),
    "d_pattern": pa.string(),
    "d_param": pa.string(),
    "learn": pa.bool_(),
    "q_mask": pa.string(),  # JSON n x n 0/1
    "d_mask": pa.string(),
    "q_nnz": pa.int32(),  # free (or non-zero, for fixed) entries of U / L
    "d_nnz": pa.int32(),
    "structure_hash": pa.string(),
    "config_hash": pa.string(),  # structure + hyperparameters + seed (dedupe key)
    "config_group": pa.string(),  # the same without the seed (mean +- std over seeds)
    "duplicate_of": pa.int64(),
    "retry_of": pa.int64(),
    "confirm_round": pa.int64(),  # a confirmation trial's round (its fresh seed); null for a search trial
    "confirm_role": pa.string(),  # incumbent | baseline | challenger (confirmation trials only)
    "params": pa.string(),  # JSON of all suggested parameters
    "lr": pa.float64(),
    "process_lr": pa.float64(),
    "gamma": pa.float64(),
    "beta_1": pa.float64(),
    "time_sampler": pa.string(),
    "parameterization": pa.string(),  # noise predictor: eps | mixed (Gaussian residual)
    "residual_stats": pa.string(),  # pixel | floored | global (mixed), null for eps
    "val_bpd": pa.float64(),
    "val_bpd_se": pa.float64(),
    "test_bpd": pa.float64(),
    "best_val_bpd": pa.float64(),
    "prior_kl_per_dim": pa.float64(),
    "kid": pa.float64(),  # sample quality (docs/quality.md): KID against the training split, lower is better
    "kid_se": pa.float64(),
    "fid": pa.float64(),
    "quality": pa.string(),  # JSON: how kid/fid were measured (features, n, sampler, nfe, seed, seconds)
    "steps": pa.int64(),  # fidelity reached
    "budget_steps": pa.int64(),
    "train_seconds": pa.float64(),
    "wall_seconds": pa.float64(),
    "n_params": pa.int64(),
    "Q": pa.string(),  # JSON n x n learned (EMA) Q
    "D": pa.string(),
    # what training made of the structure (docs/math.md section 9): auxiliaries that matter, their
    # effective patterns (e.g. "K=0 (x alone, D_xx=0.71)"), their share of the precision about x0
    "eff_n_aux": pa.int32(),
    "eff_structure": pa.string(),
    "aux_share": pa.float64(),
    "coupling": pa.string(),  # JSON: the reported process's coupling (metrics.json's "coupling")
    "executor": pa.string(),  # local | ray
    "artifact_dir": pa.string(),
    "spec_hash": pa.string(),
    "started_at": pa.timestamp("us", tz="UTC"),
    "finished_at": pa.timestamp("us", tz="UTC"),
    "mdmsearch_version": pa.string(),
    "torch_version": pa.string(),
    "optuna_version": pa.string(),
}
SCHEMA = pa.schema([pa.field(k, v) for k, v in COLUMNS.items()])
CURVE_SCHEMA = pa.schema([pa.field("trial", pa.int64()), pa.field("step", pa.int64()),
                          pa.field("train_loss", pa.float64()), pa.field("val_bpd", pa.float64()),
                          pa.field("train_seconds", pa.float64()), pa.field("kid", pa.float64()),
                          pa.field("kid_se", pa.float64())])  # (kid: the final evaluation's row only)


def _partition(root: Path, dataset: str, study: str) -> Path:
    return Path(root) / f"dataset={dataset}" / f"study={study}"


def trial_path(root: str | Path, dataset: str, study: str, trial: int) -> Path:
    """The file of one trial's row (or learning curve, under the curves root)."""
    return _partition(Path(root), dataset, study) / f"trial-{int(trial)}.parquet"


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_trial(root: str | Path, dataset: str, study: str, row: dict) -> Path:
    """Write one trial's row (unknown keys are an error, missing ones null)."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown leaderboard columns: {sorted(unknown)}")
    full = {k: [_clean(row.get(k))] for k in COLUMNS}
    full["schema_version"] = [SCHEMA_VERSION]
    table = pa.table(full, schema=SCHEMA)
    path = trial_path(root, dataset, study, row["trial"])
    _atomic_parquet(table, path)
    return path


def write_curve(root: str | Path, dataset: str, study: str, trial: int, history: Iterable[dict]) -> Path:
    rows = list(history)
    cols = {f.name: [_clean(r.get(f.name)) for r in rows] for f in CURVE_SCHEMA if f.name != "trial"}
    cols["trial"] = [int(trial)] * len(rows)
    table = pa.table({f.name: cols[f.name] for f in CURVE_SCHEMA}, schema=CURVE_SCHEMA)
    path = trial_path(root, dataset, study, trial)
    _atomic_parquet(table, path)
    return path


def read_tree(root: str | Path, dataset: str | None = None):
    """The whole tree (or one dataset's part) as a pandas DataFrame; dataset/study as str.
    An unreadable row file is skipped with one warning naming it (see :func:`read_files`)."""
    root = Path(root)
    target = root / f"dataset={dataset}" if dataset else root
    if not target.exists() or not any(target.rglob("*.parquet")):
        where = f"dataset {dataset!r} in {root}" if dataset else str(root)
        raise MDMError(f"no leaderboard results for {where}; run `mdmsearch run SPEC.yaml` first")
    # files written before a column existed lack it: concatenation leaves it null there
    df = read_files(target, root)
    if dataset:
        df["dataset"] = dataset
    return df


def read_files(target: str | Path, root: str | Path, what: str = "leaderboard row"):
    """Every ``*.parquet`` file under ``target`` as one DataFrame, with the Hive partition
    values of its path below ``root`` (``dataset=...``, ``study=...``) as string columns.

    A damaged file (a disk error, a copy cut short) costs its own row only: it is skipped
    and named in one warning, with the command that writes it again."""
    import pandas as pd

    target, root = Path(target), Path(root)
    frames, bad = [], []
    for path in sorted(target.rglob("*.parquet")):
        try:
            frame = pq.read_table(path).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            bad.append((path, exc))
            continue
        for part in path.relative_to(root).parent.parts:
            key, sep, value = part.partition("=")
            if sep:
                frame[key] = value
        frames.append(frame)
    if bad:
        names = ", ".join(str(p) for p, _ in bad)
        log.warning("skipped %d unreadable %s file(s): %s (%s); rewrite them with "
                    "`mdmsearch rebuild STUDY --studies-dir DIR`", len(bad), what, names,
                    str(bad[0][1]).splitlines()[0] if str(bad[0][1]) else type(bad[0][1]).__name__)
    if not frames:
        raise MDMError(f"no readable {what} files under {target}")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def mask_json(mask) -> str:
    return json.dumps([[int(v) for v in row] for row in mask])


CONFIRMATION_FILE = "_confirmation.json"  # beside a study's rows; '_' keeps it out of Parquet readers
# the ``seeds`` column of the ranked view: which runs a configuration's numbers are over
FRESH, SEARCH = "fresh", "search"
TIERS = ("winner", "raced", "searched")  # the ranking rule's tiers, in order (docs/search.md)


def confirmation_path(root: str | Path, dataset: str, study: str) -> Path:
    return _partition(Path(root), dataset, study) / CONFIRMATION_FILE


def write_confirmation(root: str | Path, dataset: str, study: str, info: dict) -> Path:
    """The study's ended confirmation (``{}`` once it is reopened), next to its rows, so that the
    leaderboard and the report read the same winner as ``status`` without opening the study."""
    path = confirmation_path(root, dataset, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(info, sort_keys=True, default=str)))
    return path


def read_confirmations(root: str | Path, dataset: str | None = None) -> dict:
    """{(dataset, study): ended confirmation} of the studies under ``root`` that have one; an
    unreadable file is skipped with a warning (``mdmsearch rebuild`` writes it again)."""
    out = {}
    base = Path(root) / f"dataset={dataset}" if dataset else Path(root)
    for path in sorted(base.rglob(CONFIRMATION_FILE)):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable %s (%s); `mdmsearch rebuild STUDY` writes it again", path, exc)
            continue
        parts = dict(p.partition("=")[::2] for p in path.relative_to(root).parent.parts if "=" in p)
        if info.get("winner"):
            out[(parts.get("dataset", dataset), parts.get("study"))] = info
    return out


def ranked(df, metric: str = "val_bpd", confirmations: dict | None = None):
    """Merged, ranked view: one row per configuration, mean ± std over seeds.

    The ranking rule, so that a one-seed mean never outranks a confirmed configuration by luck
    (``confirmations``: :func:`read_confirmations`):

    1. ``winner``: the configurations an ended confirmation chose,
    2. ``raced``: the other configurations that confirmation trained on fresh seeds
       (the baseline, the challengers),
    3. ``searched``: every other configuration.

    Within a tier, by mean ``metric``.  Tiers 1-2 show their fresh-seed numbers (``seeds`` =
    "fresh": the seeds that took no part in selecting them) and their margin to the confirmation's
    baseline on the fresh seeds' test split, as the confirmation reports it; ``all_val_bpd`` and
    ``all_n`` add every seed, the selecting ones included.  Tier 3 shows its search seeds
    (``seeds`` = "search") and its margin to the best baseline over held-out examples."""
    import pandas as pd

    ok = df[(df["state"] == "COMPLETE") & df[metric].notna()].copy()  # duplicates would double-count
    if ok.empty:
        return pd.DataFrame()
    ok["group"] = ok["config_group"]
    ok["fresh"] = ok["confirm_round"].notna() if "confirm_round" in ok.columns else False
    keys = ["dataset", "config_group"]
    # every run is listed, but replicates are distinct seeds: one seed in two studies counts once
    runs = ok.groupby(keys, dropna=False).agg(
        studies=("study", lambda s: ",".join(sorted(set(s)))),
        trials=("trial", lambda s: ",".join(str(int(v)) for v in sorted(s))),
    ).reset_index()
    ok = distinct_seeds(ok)
    ok["label"] = ok.apply(_label, axis=1)
    every = ok.groupby(keys, dropna=False).agg(all_val_bpd=(metric, "mean"), all_n=(metric, "count")).reset_index()
    raced = ok.groupby(keys, dropna=False)["fresh"].transform("any")
    shown = ok[ok["fresh"] | ~raced]  # a raced configuration: its fresh seeds only
    agg = shown.groupby(keys, dropna=False).agg(
        label=("label", "first"), baseline=("baseline", "first"), n_aux=("n_aux", "first"),
        q_pattern=("q_pattern", "first"), d_pattern=("d_pattern", "first"),
        val_bpd=(metric, "mean"), val_std=(metric, "std"), test_bpd=("test_bpd", "mean"),
        test_std=("test_bpd", "std"), n=(metric, "count"), steps=("steps", "max"),
        train_seconds=("train_seconds", "mean"), fresh=("fresh", "any"),
        **({"kid": ("kid", "mean")} if "kid" in ok.columns else {}),
    ).reset_index().merge(runs, on=keys, how="left").merge(every, on=keys, how="left")
    agg["label"] = distinct_labels(agg["label"], agg["config_group"])
    agg["tier"] = [tier_of(ds, g, f, confirmations or {})
                   for ds, g, f in zip(agg["dataset"], agg["config_group"], agg["fresh"])]
    agg["seeds"] = [FRESH if f else SEARCH for f in agg["fresh"]]
    for col in ("steps", "n", "all_n"):
        agg[col] = agg[col].astype("Int64")
    agg["_tier"] = agg["tier"].map(TIERS.index)
    agg = agg.sort_values(["dataset", "_tier", "val_bpd"]).drop(columns=["_tier", "fresh"]).reset_index(drop=True)
    return _vs_best_baseline(ok, agg, confirmations or {})


def _vs_best_baseline(rows, agg, confirmations: dict):
    """Adds each configuration's structure comparison with its reference baseline (see
    :func:`ranked`; compare.py): ``vs_baseline``, ``vs_baseline_se`` (the seed-level SE; NaN with one
    seed), ``ci_low``/``ci_high`` (its interval at the verdict's level ``ci_level``: 0.95, or a race's look's), ``p_better`` (P(config < baseline) over seeds),
    ``verdict`` ("not decided (1 seed)" unless both have >= 2 seeds) and ``margin_on`` (which runs
    and split)."""
    comps, on = {}, {}
    with_runs = rows[rows["artifact_dir"].notna()]
    for dataset, part in with_runs.groupby("dataset", dropna=False):
        groups = {g: list(zip(r["seed"], r["artifact_dir"])) for g, r in part[~part["fresh"]].groupby("config_group")}
        fresh_runs = {g: list(zip(r["seed"], r["artifact_dir"])) for g, r in part[part["fresh"]].groupby("config_group")}
        mine = agg[agg["dataset"] == dataset]
        base = mine[mine["baseline"].notna() & (mine["tier"] != TIERS[0])]
        confirmed_base = confirmed_baselines(dataset, confirmations)
        reference = next((g for g in base["config_group"] if g in confirmed_base), None)
        if reference is None and not base.empty:
            reference = base.sort_values("val_bpd").iloc[0]["config_group"]
        if reference is None:
            continue
        fresh = set(mine[mine["seeds"] == FRESH]["config_group"])
        info = next((i for (ds, _), i in confirmations.items() if ds == dataset and i["baseline"]["group"] == reference),
                    None)
        for g, (comp, where) in margins(groups, fresh_runs, reference, fresh, info).items():
            comps[(dataset, g)], on[(dataset, g)] = comp, where
    cols: dict[str, list] = {k: [] for k in ("vs_baseline", "vs_baseline_se", "ci_low", "ci_high", "ci_level", "p_better")}
    words, where = [], []
    for rec in agg.to_dict("records"):
        comp = comps.get((rec["dataset"], rec["config_group"]))
        lo, hi = verdict_interval(comp)
        for k, v in zip(cols, (comp.diff if comp else None, comp.se if comp and comp.decided else None, lo, hi,
                               1 - comp.alpha if lo is not None else None, comp.p_better if comp else None)):
            cols[k].append(v)
        words.append(comp.verdict if comp else None)
        where.append(on.get((rec["dataset"], rec["config_group"])) if comp else None)
    return agg.assign(**{k: pd_float(v) for k, v in cols.items()}, verdict=words, margin_on=where)


def margins(search_runs: dict, fresh_runs: dict, reference: str, fresh: set, confirmation: dict | None = None) -> dict:
    """{group: (StructureComparison or None, what it is over)} against the ``reference`` group,
    the one rule of the leaderboard and the report: a configuration the confirmation raced
    (``fresh``) over its fresh seeds' test split, as the confirmation reports its winner (the
    seeds that selected it left out; validation decided the race), at the level of the
    confirmation's last look; the winner exactly as ``confirmation`` (its stored result) measured
    it: over the same seeds, at the same level.  Any other configuration over the search's seeds
    and held-out examples (paired with the reference where they share seeds).  ``*_runs`` map a
    group to [(seed, run directory)]."""
    out = {g: (c, f"{SEARCH} seeds, held-out") for g, c in vs_reference(search_runs, reference).items()
           if g not in fresh}
    info = confirmation or {}
    level = (info.get("vs_baseline") or {}).get("alpha") or ALPHA
    winner = (info.get("winner") or {}).get("group")
    for g in fresh:
        runs, ref = fresh_runs.get(g, []), fresh_runs.get(reference, [])
        if g == winner and info.get("fresh_seeds"):  # the seeds behind the confirmation's margin
            keep = set(info["fresh_seeds"])
            runs, ref = [r for r in runs if r[0] in keep], [r for r in ref if r[0] in keep]
        comp = compare_structures(read_runs(runs, split="test"), read_runs(ref, split="test"))
        out[g] = (replace(comp, alpha=level) if comp else None, f"{FRESH} seeds, test")
    return out


def tier_of(dataset: str, group: str, fresh: bool, confirmations: dict) -> str:
    """The ranking rule's tier of a configuration (see :func:`ranked`)."""
    if any(ds == dataset and info["winner"]["group"] == group for (ds, _), info in confirmations.items()):
        return TIERS[0]
    return TIERS[1] if fresh else TIERS[2]


def confirmed_baselines(dataset: str, confirmations: dict) -> set:
    """The groups of the baselines the dataset's confirmations measured their winners against."""
    return {info["baseline"]["group"] for (ds, _), info in confirmations.items() if ds == dataset}


def verdict_interval(comp) -> tuple:
    """The interval of a structure comparison at its verdict's level (95% unless a race's look
    decided at another), (None, None) when it is not decided."""
    if comp is None or not comp.decided:
        return None, None
    return comp.interval(comp.alpha)


def pd_float(values):
    import pandas as pd

    return pd.array([float("nan") if v is None else v for v in values], dtype="float64")


# trial parameters that are structure (in the label's first part) or the seed (not a configuration's)
_NOT_HYPER = ("n_aux", "q_pattern", "d_pattern", "d_param", "learn", "seed")
_PER_ENTRY = re.compile(r"^[ql]_\d+$")  # per-entry structure dimensions q_ij / l_ij (in the masks)


_HYPER_COLUMNS = ("lr", "process_lr", "gamma", "beta_1", "time_sampler")  # rows without their parameters


def _inert_params(fields: Any) -> set:
    """Searched parameters that change nothing for this configuration (search/dimensions.py
    ``inert``), left out of its label: process_lr for a fixed process (a baseline, or Q and D not
    learned), gamma without auxiliary variables."""
    get = fields.get
    inert = set()
    if (isinstance(get("baseline"), str) and get("baseline")) or get("learn") in (False,):  # (numpy's False too)
        inert.add("process_lr")
    if get("n_aux") in (0,):  # (numpy's 0 too; NaN and None are not)
        inert.add("gamma")
    return inert


def _hyper_text(fields: Any) -> str:
    """``lr=0.002 process_lr=0.03 time_sampler=adaptive``: the searched hyperparameters of a
    configuration (its trial parameters ``params``, a dict or its JSON), sorted by name; for a row
    without them, its hyperparameter columns."""
    params = fields.get("params")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            params = None
    if not isinstance(params, dict):
        params = {k: fields.get(k) for k in _HYPER_COLUMNS
                  if isinstance(fields.get(k), str) or (isinstance(fields.get(k), float) and math.isfinite(fields[k]))}
    inert = _inert_params(fields)
    items = sorted((k, v) for k, v in params.items()
                   if k not in _NOT_HYPER and k not in inert and not _PER_ENTRY.match(k))
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                    for k, v in items)


def config_label(fields: Any) -> str:
    """The one label of a configuration, everywhere (run and status lines, leaderboard, report):
    its structure, then the hyperparameters its study searched, e.g.
    ``learned K=3 Q:chain D:diag/cholesky (lr=0.002 process_lr=0.03 time_sampler=adaptive)`` or
    ``VPSDE (lr=0.002 time_sampler=vp)``.  ``fields``: a leaderboard row or any mapping with
    baseline, n_aux, q_pattern, d_pattern, d_param and params.  Two configurations of one study
    differ in a structure field or a searched parameter, so their labels differ;
    :func:`distinct_labels` settles what is left (studies that fixed other values)."""
    get = fields.get
    baseline = get("baseline")
    if isinstance(baseline, str) and baseline:
        head = baseline.upper()
    else:
        d_param = get("d_param")
        d = f"D:{get('d_pattern')}" + (f"/{d_param}" if isinstance(d_param, str) and d_param else "")
        head = f"learned K={int(get('n_aux'))} Q:{get('q_pattern')} {d}"
        if get("learn") is not None and get("learn") in (False,):  # (numpy's False too; NaN is not)
            head += " fixed"
    hyper = _hyper_text(fields)
    return f"{head} ({hyper})" if hyper else head


def distinct_labels(labels: Iterable[str], groups: Iterable[str]) -> list[str]:
    """Labels that two configuration groups share get the group's short hash: ``... #a1b2c3``."""
    labels, groups = list(labels), list(groups)
    owners: dict[str, set] = {}
    for lab, g in zip(labels, groups):
        owners.setdefault(lab, set()).add(g)
    return [f"{lab} #{str(g)[:6]}" if len(owners[lab]) > 1 else lab for lab, g in zip(labels, groups)]


def _label(row) -> str:
    return config_label(row)


def with_effective(rows, view):
    """``view`` (:func:`ranked`) with each configuration's effective structure over its seeds
    (docs/math.md section 9): ``eff_n_aux`` (the largest over its seeds: a collapse is reported
    only when every seed collapsed), ``eff_structure`` (that seed's effective label),
    ``aux_share`` (median over seeds) and ``collapsed`` (eff_n_aux < n_aux).  Rows written before
    these columns existed leave them empty."""
    import pandas as pd

    if view.empty:
        return view
    cols = {"eff_n_aux": pd.NA, "eff_structure": None, "aux_share": float("nan"), "collapsed": pd.NA}
    if "eff_n_aux" not in rows.columns:
        return view.assign(**cols)
    ok = rows[(rows["state"] == "COMPLETE") & rows["eff_n_aux"].notna()]
    found = {}
    for key, part in ok.groupby(["dataset", "config_group"], dropna=False):
        top = part.sort_values("eff_n_aux", ascending=False).iloc[0]
        found[key] = (int(top["eff_n_aux"]), top["eff_structure"], float(part["aux_share"].median()))
    eff = [found.get(k, (pd.NA, None, float("nan"))) for k in zip(view["dataset"], view["config_group"])]
    out = view.assign(eff_n_aux=pd.array([e[0] for e in eff], dtype="Int64"), eff_structure=[e[1] for e in eff],
                      aux_share=pd_float([e[2] for e in eff]))
    return out.assign(collapsed=pd.array([pd.NA if pd.isna(e) else bool(e < k) for e, k in
                                          zip(out["eff_n_aux"], out["n_aux"])], dtype="boolean"))
