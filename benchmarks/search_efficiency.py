"""Search efficiency on digits: best validation BPD found vs wall time for random search, TPE
and the default (TPE + median pruning, the aux3 spec's choice), each repeated with several
sampler seeds under an equal wall-clock budget; reports per strategy the median and spread of
the best BPD and of the time to get within 0.02 bpd of the final best (over all runs), how many
proposals were answered as duplicates, and how many *trained* trials repeated a configuration
already seen in that run (the target is 0).  Also scaling: finished trials per hour with 1 vs
2 local workers (and the Ray executor with --ray).

    python benchmarks/search_efficiency.py --quick        # 3 strategies x 3 seeds x 2 min (--budget 180: 3 min)
    python benchmarks/search_efficiency.py                # 3 x 3 x 15 min + scaling 2 x 7.5 min
    python benchmarks/search_efficiency.py --parts scaling --ray   # redo only the scaling part

A part that is not run keeps its results from the existing search_efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _common import OUT, ROOT, md_table, write

WORK = Path("/tmp/mdmsearch-search-bench")


def spec(study: str, sampler: str, pruner: str, steps: int, n_trials: int, workers: int = 1) -> dict:
    base = yaml.safe_load((ROOT / "search_spaces" / "aux3.yaml").read_text())
    # no baselines: they would be the first trials of every run and measure nothing about the search
    base.update(study=study, n_trials=n_trials, workers=workers, baselines=[])
    base["sampler"] = {"name": sampler, "seed": 0, "n_startup_trials": 6}
    base["pruner"] = {"name": pruner, "n_startup_trials": 4, "n_warmup_steps": steps // 4}
    # the final 384-strata ranking evaluation of aux3 would cost more than the training here; the
    # search optimizes val_bpd (eval_n_t strata), so 32 strata for the final numbers suffice
    base["budget"].update(steps=steps, eval_every=steps // 4, n_samples=0, test_n_t=32)
    return base


def run(study_spec: dict, budget: float, extra: list[str] | None = None) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{study_spec['study']}.yaml"
    path.write_text(yaml.safe_dump(study_spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "run", str(path), "--studies-dir",
                           str(WORK / "studies"), "--time-budget", str(budget), *(extra or [])],
                          capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {"wall": wall, "counts": json.loads(proc.stdout.strip().splitlines()[-1]), "t0": t0}


def anytime(study: str, t0: float):
    import pandas as pd

    df = pd.read_parquet(WORK / "studies" / "leaderboard" / "dataset=digits" / f"study={study}")
    df = df[df["state"] == "COMPLETE"].copy()
    df["t"] = df["finished_at"].map(lambda ts: ts.timestamp()) - t0
    df = df.sort_values("t")
    df["best"] = df["val_bpd"].cummin()
    return df[["t", "best", "val_bpd", "trial", "n_aux", "q_pattern", "d_pattern", "process_lr", "gamma", "time_sampler"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=None, help="wall seconds per search run")
    ap.add_argument("--ray", action="store_true", help="also measure the Ray executor in the scaling part")
    ap.add_argument("--parts", nargs="*", choices=["search", "scaling"], default=["search", "scaling"])
    ap.add_argument("--reps", type=int, default=3, help="sampler seeds per strategy")
    args = ap.parse_args()
    budget = args.budget or (120 if args.quick else 900)
    steps = 200 if args.quick else 800
    shutil.rmtree(WORK, ignore_errors=True)
    name = "search_efficiency" + ("_quick" if args.quick else "")
    previous = json.loads((OUT / f"{name}.json").read_text()) if (OUT / f"{name}.json").exists() else {}
    search = run_search(budget, steps, args.reps) if "search" in args.parts else previous.get("search")
    if "search" in args.parts:  # keep what was measured before the next part starts
        write_results(name, search, previous.get("scaling"))
    scaling = run_scaling(budget, steps, args.ray) if "scaling" in args.parts else previous.get("scaling")
    print(write_results(name, search, scaling))


def write_results(name: str, search: dict | None, scaling: dict | None):
    """JSON + Markdown of whatever parts exist (a part never run yet is left out)."""
    table = ""
    if search is not None and "summary" in search:
        table += md_table(search["summary"], ["strategy", "runs", "best_median", "best_range", "time_to_0.02_median_s",
                                              "time_to_0.02_range_s", "reached_0.02", "trained", "duplicates",
                                              "trained_repeats"],
                          {"best_median": "{:.4f}", "time_to_0.02_median_s": "{:.0f}"})
        table += "\n\n" + md_table(search["rows"], ["run", "wall_s", "trained", "complete", "duplicates",
                                                     "trained_repeats", "best_val_bpd", "time_to_within_0.02_s"],
                                    {"wall_s": "{:.0f}", "best_val_bpd": "{:.4f}", "time_to_within_0.02_s": "{:.0f}"})
        table += (f"\n\nFinal best over all runs: {search['final_best']:.4f} bpd; budget {search['budget_s']:.0f}s "
                  f"per run, {search['steps']} steps per trial, one worker. trained_repeats: trained trials whose "
                  "configuration an earlier trained trial of the same run had (target 0).\n\n")
    if scaling is not None:
        table += md_table(scaling["rows"], ["executor", "workers", "finished", "wall_s", "trials_per_hour"],
                          {"wall_s": "{:.0f}", "trials_per_hour": "{:.1f}"})
        table += (f"\n\nScaling: random search, budget {scaling['budget_s']:.0f}s per run, "
                  f"{scaling['steps']} steps per trial.")
    return write(name, {"search": search, "scaling": scaling}, table)


STRATEGIES = {"random": ("random", "none"), "tpe": ("tpe", "none"), "default (tpe + median)": ("tpe", "median")}


def run_search(budget: float, steps: int, reps: int) -> dict:
    """Each strategy with sampler seeds 0..reps-1, equal wall budget, one worker."""
    curves, rows = {}, []
    for label, (sampler, pruner) in STRATEGIES.items():
        for rep in range(reps):
            name = f"{sampler}-{pruner}-s{rep}"
            study_spec = spec(name, sampler, pruner, steps, n_trials=1000)
            study_spec["sampler"]["seed"] = rep
            res = run(study_spec, budget)
            curves[name] = anytime(name, res["t0"])
            rows.append({"strategy": label, "run": name, "wall_s": res["wall"], **trained_counts(name)})
            print(rows[-1], flush=True)
    return summarize_search(curves, rows, budget, steps)


def trained_counts(study: str) -> dict:
    """Trials that trained (complete, pruned, failed), duplicates answered from the cache, and
    trained trials whose configuration an earlier trained trial of the run already had."""
    import pandas as pd

    df = pd.read_parquet(WORK / "studies" / "leaderboard" / "dataset=digits" / f"study={study}").sort_values("trial")
    trained = df[df["state"].isin(["COMPLETE", "PRUNED", "FAIL"])]
    seen, repeats = set(), 0
    for h in trained["config_hash"]:
        repeats += h in seen
        seen.add(h)
    return {"trained": len(trained), "complete": int((df["state"] == "COMPLETE").sum()),
            "duplicates": int((df["state"] == "DUPLICATE").sum()), "trained_repeats": repeats}


def summarize_search(curves: dict, rows: list[dict], budget: float, steps: int) -> dict:
    """Best-so-far curves -> best BPD and time to within 0.02 bpd of the best of all runs, per
    run and per strategy (median, min-max)."""
    import numpy as np

    final_best = min(float(c["best"].min()) for c in curves.values() if len(c))
    for r in rows:
        c = curves[r["run"]]
        r["best_val_bpd"] = float(c["best"].min()) if len(c) else float("nan")
        hit = c[c["best"] <= final_best + 0.02]
        r["time_to_within_0.02_s"] = float(hit["t"].iloc[0]) if len(hit) else float("nan")
    summary = []
    for label in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == label]
        best = np.array([r["best_val_bpd"] for r in mine])
        hit = np.array([r["time_to_within_0.02_s"] for r in mine])
        summary.append({"strategy": label, "runs": len(mine),
                        "best_median": float(np.nanmedian(best)), "best_range": f"{np.nanmin(best):.4f}-{np.nanmax(best):.4f}",
                        "time_to_0.02_median_s": float(np.nanmedian(hit)) if np.isfinite(hit).any() else float("nan"),
                        "time_to_0.02_range_s": f"{np.nanmin(hit):.0f}-{np.nanmax(hit):.0f}" if np.isfinite(hit).any() else "-",
                        "reached_0.02": int(np.isfinite(hit).sum()),
                        "trained": int(sum(r["trained"] for r in mine)), "duplicates": int(sum(r["duplicates"] for r in mine)),
                        "trained_repeats": int(sum(r["trained_repeats"] for r in mine))})
    return {"rows": rows, "summary": summary, "final_best": final_best, "budget_s": budget, "steps": steps,
            "curves": {k: v.to_dict(orient="list") for k, v in curves.items()}}


def run_scaling(budget: float, steps: int, with_ray: bool) -> dict:
    """Finished trials per hour: 1 vs 2 local workers (and Ray with 2 workers)."""
    rows = []
    for workers in (1, 2):
        res = run(spec(f"scale-w{workers}", "random", "none", steps, n_trials=1000, workers=workers), budget / 2)
        rows.append({"executor": "local", "workers": workers, "finished": res["counts"]["finished"],
                     "wall_s": res["wall"], "trials_per_hour": 3600 * res["counts"]["finished"] / res["wall"]})
        print(rows[-1], flush=True)
    if with_ray:
        res = run(spec("scale-ray", "random", "none", steps, n_trials=1000, workers=2), budget / 2,
                  ["--executor", "ray"])
        rows.append({"executor": "ray", "workers": 2, "finished": res["counts"]["finished"], "wall_s": res["wall"],
                     "trials_per_hour": 3600 * res["counts"]["finished"] / res["wall"]})
        print(rows[-1], flush=True)
    return {"rows": rows, "budget_s": budget / 2, "steps": steps}


if __name__ == "__main__":
    main()
