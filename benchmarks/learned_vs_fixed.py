"""Learned vs fixed diffusions at CPU scale (the paper's claim, small), per parameterization.

Trains VPSDE, CLD, ALDA, MALDA and learned K = 0..3 with the same network and step budget,
several seeds each and each noise-predictor variant (eps, and the Gaussian residual with
per-pixel, floored or global statistics), on sklearn digits and on an MNIST split (a folder
with the official test split, e.g. ../shared/data/mnist: train 8000, held out the other
2000 = validation 1000 + test 1000).  Every run is evaluated on the same held-out examples
with the same evaluation seed, so entries are compared paired by seed and example, with a
paired standard error and a verdict (better / worse / tie within noise).  Optional rows
start Q and D at a preset (K = 1 at CLD, K = 2 at MALDA).

    python benchmarks/learned_vs_fixed.py --quick                         # digits, 1 seed, short
    python benchmarks/learned_vs_fixed.py --datasets digits --jobs 2      # 2000 steps, 3 seeds
    python benchmarks/learned_vs_fixed.py --datasets digits --variants eps mixed-floored
    python benchmarks/learned_vs_fixed.py --datasets mnist --jobs 2       # 600 steps, 3 seeds
    python benchmarks/learned_vs_fixed.py --datasets mnist --steps 20000  # on a GPU
    python benchmarks/learned_vs_fixed.py --fair --datasets digits --jobs 2   # tuned, fresh seeds, 95% CI

``--fair`` is the comparison as the product makes it (issue 31): every process, fixed or learned,
gets the same hyperparameter grid (the time sampler, vp or adaptive: the one searched
hyperparameter that applies to all of them), the best setting per process is picked on seed 0's
validation BPD, then the best learned and the best tuned fixed process train on ``--fresh`` new
seeds (1, 2, ...) and are compared paired by seed with mdmsearch's structure comparison: the
margin with its 95% confidence interval (t over seeds) and the verdict.  The parameterization is
each dataset's product setting (digits: mixed + global, as aux3; MNIST: auto).
"""

from __future__ import annotations

import argparse
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from _common import ROOT, md_table, write

PROCESSES = {
    "VPSDE": {"name": "vpsde"},
    "CLD": {"name": "cld"},
    "ALDA": {"name": "alda"},
    "MALDA": {"name": "malda"},
    "learned K=0": {"name": "learned", "n_aux": 0},
    "learned K=1": {"name": "learned", "n_aux": 1},
    "learned K=2": {"name": "learned", "n_aux": 2},
    "learned K=3": {"name": "learned", "n_aux": 3},
    "learned K=1 (CLD init)": {"name": "learned", "n_aux": 1, "init": "cld"},
    "learned K=2 (MALDA init)": {"name": "learned", "n_aux": 2, "init": "malda"},
}
DEFAULT_PROCESSES = [lab for lab in PROCESSES if "init" not in lab]
# parameterizations of the noise predictor (model.parameterization / model.residual_stats)
VARIANTS = {
    "eps": {"parameterization": "eps"},
    "mixed-pixel": {"parameterization": "mixed", "residual_stats": "pixel"},
    "mixed-floored": {"parameterization": "mixed", "residual_stats": "floored"},
    "mixed-global": {"parameterization": "mixed", "residual_stats": "global"},
    "auto": {"parameterization": "auto", "residual_stats": "global"},
}
FAIR_VARIANT = {"digits": "mixed-global", "mnist": "auto"}  # --fair: what aux3 / the run config default use
TIME_SAMPLERS = ("vp", "adaptive")  # --fair: the grid every process gets
FULL_STEPS = {"digits": 2000, "mnist": 600}
# learned-from-preset rows and the preset they are paired with
PAIRED = {"learned K=1 (CLD init)": "CLD", "learned K=2 (MALDA init)": "MALDA"}


def data_cfg(name: str) -> dict:
    if name == "mnist":
        return {"name": "mnist", "data_dir": str(ROOT.parent / "shared" / "data" / "mnist"),
                "n_train": 8000, "n_val": 1000, "n_test": 1000}
    return {"name": name}


def run_one(dataset: str, proc: dict, variant: dict, seed: int, steps: int, n_t: int, out: str,
            time_sampler: str = "vp") -> dict:
    """One training run (in a worker process: one torch thread); a finished run in ``out`` is
    read back instead of trained again, so an interrupted benchmark continues."""
    import json

    import pandas as pd
    import torch

    from mdmsearch.config import parse_run_config
    from mdmsearch.training import Trainer
    from mdmsearch.training.trainer import PER_EXAMPLE_FILE

    torch.set_num_threads(1)
    out = Path(out)
    if not ((out / "metrics.json").is_file() and (out / PER_EXAMPLE_FILE).is_file()):
        cfg = parse_run_config({
            "process": proc, "data": data_cfg(dataset), "model": {"name": "unet", "size": "tiny", **variant},
            "optim": {"batch_size": 64, "lr": 2e-3, "process_lr": 1e-2},
            # the same n_t for val and test: their union is one held-out set evaluated alike
            "train": {"steps": steps, "eval_every": steps, "eval_examples": 1000, "seed": seed, "n_samples": 0,
                      "progress": False, "time_sampler": time_sampler, "eval_n_t": n_t, "test_n_t": n_t},
        })
        Trainer(cfg, out).fit()
    m = json.loads((out / "metrics.json").read_text())
    per = pd.read_parquet(out / PER_EXAMPLE_FILE).sort_values(["split", "index"], ascending=[False, True])
    return {**{k: m[k] for k in ("val_bpd", "test_bpd", "train_seconds", "Q", "D")},
            "heldout": per["bpd"].tolist()}  # val then test, in example order


def paired(a_runs: list[dict], b_runs: list[dict]) -> dict:
    """a minus b, paired by seed and held-out example.  se_eval: evaluation noise of the trained
    models only (per-seed example-paired SEs pooled); se_seed: spread of the per-seed mean
    differences over seeds (training noise included); se = the larger."""
    per_seed, se_eval2 = [], 0.0
    for a, b in zip(a_runs, b_runs):
        diff = [x - y for x, y in zip(a["heldout"], b["heldout"])]
        per_seed.append(statistics.mean(diff))
        se_eval2 += statistics.variance(diff) / len(diff)
    s = len(per_seed)
    se_eval = se_eval2 ** 0.5 / s
    se_seed = statistics.stdev(per_seed) / s ** 0.5 if s > 1 else float("nan")
    se = max(se_eval, se_seed) if s > 1 else se_eval
    diff = statistics.mean(per_seed)
    return {"diff": diff, "se": se, "se_eval": se_eval, "se_seed": se_seed, "per_seed": per_seed,
            "verdict": verdict(diff, se)}


def verdict(diff: float, se: float) -> str:
    """BPD difference a - b: 'better' (a lower) / 'worse' beyond 2 paired SE, else a tie."""
    if abs(diff) <= 2 * se:
        return "tie within noise"
    return "better" if diff < 0 else "worse"


def summarize(ds: str, label: str, variant: str, runs: list[dict], steps: int) -> dict:
    test = [r["test_bpd"] for r in runs]
    held = [statistics.mean(r["heldout"]) for r in runs]
    return {"dataset": ds, "process": label, "variant": variant, "test_bpd": statistics.mean(test),
            "heldout_bpd": statistics.mean(held), "heldout_std": statistics.stdev(held) if len(held) > 1 else float("nan"),
            "n": len(runs), "n_heldout": len(runs[0]["heldout"]),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs), "steps": steps,
            "per_seed_heldout_bpd": held, "Q_seed0": runs[0]["Q"], "D_seed0": runs[0]["D"]}


def comparisons(ds: str, labels: list[str], variants: list[str], res: dict) -> tuple[list[dict], list[str]]:
    """Each entry vs its own eps run and vs the best fixed eps entry; the headline verdicts."""
    rows, lines = [], []
    mean = {key: statistics.mean(statistics.mean(r["heldout"]) for r in runs) for key, runs in res.items()}
    fixed = [k for k in res if not k[0].startswith("learned")]
    learned = [k for k in res if k[0].startswith("learned")]
    for lab in labels:
        for var in variants:
            if var != "eps" and "eps" in variants:
                c = paired(res[(lab, var)], res[(lab, "eps")])
                rows.append({"dataset": ds, "entry": f"{lab} [{var}]", "minus": f"{lab} [eps]", **c})
    if fixed and learned:
        bf, bl = min(fixed, key=mean.get), min(learned, key=mean.get)
        c = paired(res[bl], res[bf])
        rows.append({"dataset": ds, "entry": f"{bl[0]} [{bl[1]}]", "minus": f"{bf[0]} [{bf[1]}]", **c})
        lines.append(f"- {ds}: best learned {bl[0]} [{bl[1]}] {mean[bl]:.4f} vs best fixed {bf[0]} [{bf[1]}] "
                     f"{mean[bf]:.4f}: {c['diff']:+.4f} ± {c['se']:.4f} bpd (paired SE) -> learned is "
                     f"**{c['verdict']}**" + (" than the best fixed process" if c["verdict"] != "tie within noise" else ""))
    for lab, ref in PAIRED.items():
        for var in variants:
            if (lab, var) in res and (ref, var) in res:
                c = paired(res[(lab, var)], res[(ref, var)])
                rows.append({"dataset": ds, "entry": f"{lab} [{var}]", "minus": f"{ref} [{var}]", **c})
    return rows, lines


def _run_all(pool, jobs: dict) -> dict:
    """{key: result} of run_one for {key: run_one arguments}, trained in the pool."""
    futures = {key: pool.submit(run_one, *a) for key, a in jobs.items()}
    return {key: f.result() for key, f in futures.items()}


def fair(pool, ds: str, labels: list[str], steps: int, fresh: int, n_t: int, workdir: str) -> tuple[list, list, list]:
    """Tune every process's time sampler on seed 0 (validation), then the best learned and the best
    tuned fixed process on ``fresh`` new seeds: (tuning rows, fresh rows, [the verdict row])."""
    import numpy as np

    from mdmsearch.compare import compare_structures

    var = FAIR_VARIANT.get(ds, "mixed-global")
    root = Path(workdir) / "fair" / ds / var

    def args(lab: str, ts: str, seed: int) -> tuple:
        return (ds, PROCESSES[lab], VARIANTS[var], seed, steps, n_t,
                str(root / lab.replace(" ", "_") / ts / f"{steps}-{seed}"), ts)

    tuned = _run_all(pool, {(lab, ts): args(lab, ts, 0) for lab in labels for ts in TIME_SAMPLERS})
    best_ts = {lab: min(TIME_SAMPLERS, key=lambda ts: tuned[(lab, ts)]["val_bpd"]) for lab in labels}
    tune_rows = [{"dataset": ds, "process": lab, "variant": var, "time_sampler": ts, "seed": 0,
                  "val_bpd": tuned[(lab, ts)]["val_bpd"], "test_bpd": tuned[(lab, ts)]["test_bpd"],
                  "chosen": ts == best_ts[lab], "train_seconds": tuned[(lab, ts)]["train_seconds"]}
                 for lab in labels for ts in TIME_SAMPLERS]
    score = {lab: tuned[(lab, best_ts[lab])]["val_bpd"] for lab in labels}
    fixed = [lab for lab in labels if not lab.startswith("learned")]
    learned = [lab for lab in labels if lab.startswith("learned")]
    if not fixed or not learned:
        return tune_rows, [], []
    bf, bl = min(fixed, key=score.get), min(learned, key=score.get)
    seeds = list(range(1, fresh + 1))
    runs = _run_all(pool, {(lab, s): args(lab, best_ts[lab], s) for lab in (bl, bf) for s in seeds})
    fresh_rows = [{"dataset": ds, "process": lab, "variant": var, "time_sampler": best_ts[lab], "seed": s,
                   "val_bpd": runs[(lab, s)]["val_bpd"], "test_bpd": runs[(lab, s)]["test_bpd"],
                   "heldout_bpd": float(np.mean(runs[(lab, s)]["heldout"]))} for lab in (bl, bf) for s in seeds]
    held = {lab: {s: np.asarray(runs[(lab, s)]["heldout"], dtype=np.float64) for s in seeds} for lab in (bl, bf)}
    comp = compare_structures(held[bl], held[bf])
    lo, hi = comp.interval(0.05)
    verdict = {"dataset": ds, "entry": f"{bl} (t {best_ts[bl]})", "minus": f"{bf} (t {best_ts[bf]})",
               "diff": comp.diff, "ci_low": lo, "ci_high": hi, "se": comp.se, "df": comp.df,
               "p_better": comp.p_better, "n_seeds": comp.n_seeds, "verdict": comp.verdict,
               "text": comp.describe()}
    return tune_rows, fresh_rows, [verdict]


def main_fair(args, datasets: list[str], labels: list[str]) -> None:
    steps_for = {ds: args.steps or FULL_STEPS.get(ds, 2000) for ds in datasets}
    tune, fresh, verdicts = [], [], []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for ds in datasets:
            t, f, v = fair(pool, ds, labels, steps_for[ds], args.fresh, args.n_t, args.workdir)
            tune, fresh, verdicts = tune + t, fresh + f, verdicts + v
    fmt = {"val_bpd": "{:.4f}", "test_bpd": "{:.4f}", "heldout_bpd": "{:.4f}", "train_seconds": "{:.1f}",
           "diff": "{:+.4f}", "ci_low": "{:+.4f}", "ci_high": "{:+.4f}", "se": "{:.4f}", "p_better": "{:.2f}",
           "df": "{:.0f}"}
    lines = [f"- {v['dataset']}: {v['entry']} (the best learned) minus {v['minus']} (the best tuned fixed): "
             f"{v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] bpd (95% CI, {v['n_seeds']} fresh seeds "
             f"paired): **{v['verdict']}**" for v in verdicts]
    text = ("## Tuning (seed 0; the time sampler chosen on validation BPD)\n\n"
            + md_table(tune, ["dataset", "process", "variant", "time_sampler", "val_bpd", "test_bpd", "chosen",
                              "train_seconds"], fmt)
            + "\n\n## Fresh seeds (the best learned and the best tuned fixed process)\n\n"
            + md_table(fresh, ["dataset", "process", "time_sampler", "seed", "val_bpd", "test_bpd", "heldout_bpd"], fmt)
            + "\n\n## Verdict (held-out = validation + test of the fresh seeds, paired by seed)\n\n"
            + md_table(verdicts, ["dataset", "entry", "minus", "diff", "ci_low", "ci_high", "df", "p_better",
                                  "verdict"], fmt)
            + "\n\n" + "\n".join(lines)
            + f"\n\nSame tiny U-Net for every process, steps {steps_for}, batch 64, lr 2e-3, process lr 1e-2, "
              f"{args.n_t} stratified time samples per held-out example; one torch thread per run, {args.jobs} "
              "runs in parallel.  Selection uses seed 0 only; the verdict uses seeds that did not select.")
    name = args.name or "learned_vs_fixed_fair_" + "_".join(datasets)
    print(write(name, {"tuning": tune, "fresh": fresh, "verdicts": verdicts, "steps": steps_for,
                       "fresh_seeds": args.fresh, "n_t": args.n_t, "parallel_runs": args.jobs}, text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--processes", nargs="*", default=None, help=f"subset of {list(PROCESSES)}")
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (default: all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--n-t", type=int, default=32, help="stratified time samples per held-out example")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one CPU thread each)")
    ap.add_argument("--workdir", default="/tmp/mdmsearch-lvf", help="finished runs here are reused")
    ap.add_argument("--name", default=None, help="output name (default from the datasets)")
    ap.add_argument("--fair", action="store_true", help="tuned time sampler per process, then fresh seeds, 95%% CI")
    ap.add_argument("--fresh", type=int, default=6, help="--fair: fresh seeds of the two finalists")
    args = ap.parse_args()
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist"])
    labels = args.processes or DEFAULT_PROCESSES
    variants = args.variants or list(VARIANTS)
    for given, known, what in ((labels, PROCESSES, "process label"), (variants, VARIANTS, "variant")):
        unknown = [v for v in given if v not in known]
        if unknown:
            ap.error(f"unknown {what}(s) {unknown}; available: {list(known)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.fair:
        main_fair(args, datasets, labels)
        return
    # full mode on CPU: an MNIST step costs ~5x a digits step (2000 digits steps ~ 65 s, 600 MNIST ~ 100 s
    # per run at one thread); on a GPU pass --steps for converged models
    steps_for = {ds: args.steps or (300 if args.quick else FULL_STEPS.get(ds, 2000)) for ds in datasets}
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    jobs = [(ds, lab, var, s) for ds in datasets for s in seeds for var in variants for lab in labels]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        results = _run_all(pool, {job: (job[0], PROCESSES[job[1]], VARIANTS[job[2]], job[3], steps_for[job[0]],
                                        args.n_t, str(Path(args.workdir) / job[0] / job[1].replace(" ", "_") / job[2]
                                                      / f"{steps_for[job[0]]}-{job[3]}"))
                                  for job in jobs})
    rows, comps, lines = [], [], []
    for ds in datasets:
        res = {(lab, var): [results[(ds, lab, var, s)] for s in seeds] for lab in labels for var in variants}
        rows += [summarize(ds, lab, var, res[(lab, var)], steps_for[ds]) for lab in labels for var in variants]
        c, v = comparisons(ds, labels, variants, res)
        comps += c
        lines += v
    fmt = {"test_bpd": "{:.4f}", "heldout_bpd": "{:.4f}", "heldout_std": "{:.4f}", "train_seconds": "{:.1f}",
           "diff": "{:+.4f}", "se": "{:.4f}", "se_eval": "{:.4f}", "se_seed": "{:.4f}"}
    table = md_table(rows, ["dataset", "process", "variant", "heldout_bpd", "heldout_std", "test_bpd", "n",
                            "n_heldout", "train_seconds", "steps"], fmt)
    ctable = md_table(comps, ["dataset", "entry", "minus", "diff", "se", "se_eval", "se_seed", "verdict"], fmt)
    note = ("heldout_bpd: mean over seeds of the BPD of all held-out examples (validation + test; for MNIST the "
            "2000 examples outside the 8000 training ones), each evaluated with "
            f"{args.n_t} stratified time samples and the same evaluation seed (common random numbers); heldout_std: "
            "over seeds. Differences are paired by seed and example; se_eval is the evaluation noise alone, se_seed "
            "the spread over seeds, se the larger; 'tie within noise' when |diff| <= 2 se. Same tiny U-Net, "
            f"steps {steps_for}, batch 64, lr 2e-3, process lr 1e-2, VP-weighted t, seeds {seeds}.")
    name = args.name or ("learned_vs_fixed" + ("_" + "_".join(args.datasets) if args.datasets else "")
                         + ("_quick" if args.quick else ""))
    print(write(name, {"rows": rows, "comparisons": comps, "seeds": seeds, "steps": steps_for, "verdicts": lines,
                       "n_t": args.n_t, "threads_per_run": 1, "parallel_runs": args.jobs},
                table + "\n\n" + ctable + "\n\n" + "\n".join(lines) + "\n\n" + note))


if __name__ == "__main__":
    main()
