"""Fair baselines at a spec's budget: each baseline's grid of applicable hyperparameters
(mdmsearch/search/baselines.py, docs/search.md "Fair baselines"), trained as a study does.

Runs `mdmsearch run` on the spec with its baselines only (n_trials = the baseline runs, no
confirmation), then reads the leaderboard: per baseline configuration its validation and test
BPD (mean over the seeds run), and per baseline the default configuration (the one baselines ran
before) against the best-tuned one by validation BPD, the one the confirmation would race.  With
one seed a difference inside a baseline's grid is a one-seed difference: on digits two seeds of
one configuration differ by 0.01-0.02 bpd (docs/comparisons.md), so it says which setting the
rule picks, not that it is better.

    python benchmarks/baseline_grid.py                         # aux3's grid, seed 0 (about 15 min on 1 core)
    python benchmarks/baseline_grid.py --seeds 0 1 --workers 2
    python benchmarks/baseline_grid.py --steps 20              # a smoke test

The study in --workdir continues where it stopped.  Writes reports/benchmarks/baseline_grid.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from _common import ROOT, md_table, write

from mdmsearch.search.baselines import baseline_trials
from mdmsearch.search.spec import parse_spec


def grid_spec(path: Path, seeds: list[int], workers: int, steps: int | None) -> dict:
    """The spec with its baselines only: n_trials = its baseline runs, no confirmation."""
    data = yaml.safe_load(path.read_text())
    data.update(study=f"{data['study']}-baselines", seeds=seeds, workers=workers, confirm={"seeds": 0})
    if steps:
        data["budget"] = {**data.get("budget", {}), "steps": steps, "eval_every": min(steps, 250)}
    data["n_trials"] = len(baseline_trials(parse_spec(data, str(path))))
    return data


def run(data: dict, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = [sys.executable, "-m", "mdmsearch.cli", "run", str(spec_path), "--studies-dir", str(workdir / "studies")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, cwd=workdir, env=env)


def configurations(workdir: Path, study: str) -> pd.DataFrame:
    """One row per baseline configuration: label, seeds, mean validation and test BPD, and the
    first trial (the default configuration is the first a study enqueues of each baseline)."""
    df = pd.read_parquet(workdir / "studies" / "leaderboard")
    df = df[(df["study"] == study) & df["baseline"].notna() & (df["state"] == "COMPLETE")]
    from mdmsearch.leaderboard import config_label

    df = df.assign(label=[config_label(r) for _, r in df.iterrows()])
    return (df.groupby("config_group")
              .agg(baseline=("baseline", "first"), label=("label", "first"), seeds=("seed", "nunique"),
                   val_bpd=("val_bpd", "mean"), test_bpd=("test_bpd", "mean"), first_trial=("trial", "min"))
              .reset_index().sort_values(["baseline", "val_bpd"]))


def summary(configs: pd.DataFrame) -> list[dict]:
    """Per baseline: the default configuration against the best-tuned one (by validation BPD)."""
    out = []
    for name, group in configs.groupby("baseline", sort=False):
        default = group.sort_values("first_trial").iloc[0]
        best = group.sort_values("val_bpd").iloc[0]
        out.append({"baseline": name.upper(), "configurations": len(group), "default": default["label"],
                    "default_val": default["val_bpd"], "best": best["label"], "best_val": best["val_bpd"],
                    "gain_val": default["val_bpd"] - best["val_bpd"], "gain_test": default["test_bpd"] - best["test_bpd"],
                    "spread_val": group["val_bpd"].max() - group["val_bpd"].min()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "search_spaces" / "aux3.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override budget.steps (a smoke test)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mdmsearch-baseline-grid"))
    args = ap.parse_args()
    data = grid_spec(args.spec, args.seeds, args.workers, args.steps)
    run(data, args.workdir)
    configs = configurations(args.workdir, data["study"])
    rows = summary(configs)
    fmt = {c: "{:.4f}" for c in ("val_bpd", "test_bpd", "default_val", "best_val", "gain_val", "gain_test", "spread_val")}
    table = (f"Spec `{args.spec.name}`, {data['budget'].get('steps')} steps, seeds {args.seeds}: every baseline "
             f"configuration of the grid ({data['n_trials']} runs).\n\n"
             + md_table(configs.to_dict("records"), ["label", "seeds", "val_bpd", "test_bpd"], fmt)
             + "\n\nDefault configuration (what baselines ran before) against the best-tuned one by validation BPD "
               "(what the confirmation now races); gain = default - best (positive: tuning helped).\n\n"
             + md_table(rows, ["baseline", "configurations", "default_val", "best", "best_val", "gain_val", "gain_test",
                               "spread_val"], fmt))
    path = write("baseline_grid", {"spec": args.spec.name, "seeds": args.seeds, "steps": data["budget"].get("steps"),
                                   "configurations": configs.to_dict("records"), "summary": rows}, table)
    print(json.dumps(rows, indent=1, default=str))
    print(path)


if __name__ == "__main__":
    main()
