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
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .compare import distinct_seeds, vs_reference
from .errors import MDMError
from .io import atomic_write

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 2: parameterization, residual_stats; 3: kid, kid_se, fid, quality;
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


def ranked(df, metric: str = "val_bpd"):
    """Merged, ranked view: one row per configuration, mean ± std over seeds."""
    import pandas as pd

    ok = df[(df["state"] == "COMPLETE") & df[metric].notna()].copy()  # duplicates would double-count
    if ok.empty:
        return pd.DataFrame()
    ok["group"] = ok["config_group"]
    keys = ["dataset", "config_group"]
    # every run is listed, but replicates are distinct seeds: one seed in two studies counts once
    runs = ok.groupby(keys, dropna=False).agg(
        studies=("study", lambda s: ",".join(sorted(set(s)))),
        trials=("trial", lambda s: ",".join(str(int(v)) for v in sorted(s))),
    ).reset_index()
    ok = distinct_seeds(ok)
    ok["label"] = ok.apply(_label, axis=1)
    agg = ok.groupby(keys, dropna=False).agg(
        label=("label", "first"), baseline=("baseline", "first"), n_aux=("n_aux", "first"),
        q_pattern=("q_pattern", "first"), d_pattern=("d_pattern", "first"),
        val_bpd=(metric, "mean"), val_std=(metric, "std"), test_bpd=("test_bpd", "mean"),
        test_std=("test_bpd", "std"), n=(metric, "count"), steps=("steps", "max"),
        train_seconds=("train_seconds", "mean"),
        **({"kid": ("kid", "mean")} if "kid" in ok.columns else {}),
    ).reset_index().merge(runs, on=keys, how="left")
    agg["steps"] = agg["steps"].astype("Int64")
    agg["n"] = agg["n"].astype("Int64")
    agg = agg.sort_values(["dataset", "val_bpd"]).reset_index(drop=True)
    return _vs_best_baseline(ok, agg)


def _vs_best_baseline(rows, agg):
    """Adds each configuration's structure comparison with the best baseline of its dataset
    (held-out BPD over seeds, see compare.py): ``vs_baseline``, ``vs_baseline_se`` (the seed-level
    SE; NaN with one seed), ``p_better`` (P(config < baseline) over seeds) and ``verdict``
    ("not decided (1 seed)" unless both have >= 2 seeds)."""
    comps = {}
    for dataset, part in rows[rows["artifact_dir"].notna()].groupby("dataset", dropna=False):
        groups = {g: list(zip(runs["seed"], runs["artifact_dir"])) for g, runs in part.groupby("config_group")}
        base = agg[(agg["dataset"] == dataset) & agg["baseline"].notna()]
        if not base.empty:  # agg is sorted: the first baseline is the best one
            comps.update({(dataset, g): c for g, c in vs_reference(groups, base.iloc[0]["config_group"]).items()})
    diffs, ses, probs, words = [], [], [], []
    for rec in agg.to_dict("records"):
        comp = comps.get((rec["dataset"], rec["config_group"]))
        diffs.append(comp.diff if comp else None)
        ses.append(comp.se if comp and comp.decided else None)
        probs.append(comp.p_better if comp else None)
        words.append(comp.verdict if comp else None)
    return agg.assign(vs_baseline=pd_float(diffs), vs_baseline_se=pd_float(ses), p_better=pd_float(probs),
                      verdict=words)


def pd_float(values):
    import pandas as pd

    return pd.array([float("nan") if v is None else v for v in values], dtype="float64")


def _label(row) -> str:
    hyper = f"lr={row['lr']:g} plr={row['process_lr']:g} gamma={row['gamma']:g} t~{row['time_sampler']}"
    par = row.get("parameterization")
    if isinstance(par, str):
        hyper += f" {par}" + (f"/{row['residual_stats']}" if isinstance(row.get("residual_stats"), str) else "")
    if isinstance(row.get("baseline"), str) and row["baseline"]:
        return f"{row['baseline'].upper()} ({hyper})"
    return f"learned K={int(row['n_aux'])} Q:{row['q_pattern']} D:{row['d_pattern']}/{row['d_param']} ({hyper})"


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
