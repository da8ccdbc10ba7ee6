"""Learned vs fixed diffusions at CPU scale (the paper's claim, small).

Trains VPSDE, CLD, ALDA, MALDA and learned K = 1, 2, 3 with the same network and step budget,
several seeds each, on sklearn digits and on the MNIST 10k test split in ../shared/data/mnist
(fixed seeded split: train 8000, evaluate on the other 2000 = validation 1000 + test 1000),
and reports test BPD mean ± std and whether a learned process beats the best fixed one.
Two more learned rows start Q and D at a preset (K = 1 at CLD, K = 2 at MALDA) and are
compared with that preset seed by seed: does learning improve on a good starting process?

    python benchmarks/learned_vs_fixed.py --quick                         # digits, 1 seed, short
    python benchmarks/learned_vs_fixed.py --datasets digits               # 2000 steps, 3 seeds
    python benchmarks/learned_vs_fixed.py --datasets mnist --jobs 2       # 600 steps, 3 seeds
    python benchmarks/learned_vs_fixed.py --datasets mnist --steps 20000  # on a GPU
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
    "learned K=1": {"name": "learned", "n_aux": 1},
    "learned K=2": {"name": "learned", "n_aux": 2},
    "learned K=3": {"name": "learned", "n_aux": 3},
    "learned K=1 (CLD init)": {"name": "learned", "n_aux": 1, "init": "cld"},
    "learned K=2 (MALDA init)": {"name": "learned", "n_aux": 2, "init": "malda"},
}
# learned-from-preset rows and the preset they are paired with
FULL_STEPS = {"digits": 2000, "mnist": 600}
PAIRED = {"learned K=1 (CLD init)": "CLD", "learned K=2 (MALDA init)": "MALDA"}


def data_cfg(name: str) -> dict:
    if name == "mnist":
        return {"name": "mnist", "data_dir": str(ROOT.parent / "shared" / "data" / "mnist"),
                "n_train": 8000, "n_val": 1000, "n_test": 1000}
    return {"name": name}


def run_one(dataset: str, proc: dict, seed: int, steps: int, out: str) -> dict:
    """One training run (in a worker process: one torch thread)."""
    import torch

    from mdmsearch.config import parse_run_config
    from mdmsearch.training import Trainer

    torch.set_num_threads(1)
    cfg = parse_run_config({
        "process": proc, "data": data_cfg(dataset), "model": {"name": "unet", "size": "tiny"},
        "optim": {"batch_size": 64, "lr": 2e-3, "process_lr": 1e-2},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 1000, "seed": seed, "n_samples": 0,
                  "progress": False, "time_sampler": "vp"},
    })
    m = Trainer(cfg, Path(out)).fit()
    return {k: m[k] for k in ("val_bpd", "test_bpd", "train_seconds", "Q", "D")}


def summarize(ds: str, label: str, runs: list[dict], steps: int) -> dict:
    test = [r["test_bpd"] for r in runs]
    return {"dataset": ds, "process": label, "test_bpd": statistics.mean(test),
            "test_std": statistics.stdev(test) if len(test) > 1 else float("nan"), "n": len(test),
            # val and test have the same size: their mean is the BPD of all held-out examples
            "heldout_bpd": statistics.mean((r["val_bpd"] + r["test_bpd"]) / 2 for r in runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs), "steps": steps,
            "per_seed_test_bpd": test, "Q_seed0": runs[0]["Q"], "D_seed0": runs[0]["D"]}


def verdicts(ds: str, rows: list[dict]) -> list[str]:
    by = {r["process"]: r for r in rows}
    out = []
    fixed = [r for r in rows if not r["process"].startswith("learned")]
    learned = [r for r in rows if r["process"].startswith("learned")]
    if fixed and learned:
        bf, bl = min(fixed, key=lambda r: r["test_bpd"]), min(learned, key=lambda r: r["test_bpd"])
        margin = bf["test_bpd"] - bl["test_bpd"]
        out.append(f"- {ds}: best learned {bl['process']} {bl['test_bpd']:.4f} vs best fixed {bf['process']} "
                   f"{bf['test_bpd']:.4f}: learned {'beats' if margin > 0 else 'does not beat'} fixed "
                   f"({margin:+.4f} bpd)")
    for lab, ref in PAIRED.items():
        if lab in by and ref in by:
            diffs = [a - b for a, b in zip(by[lab]["per_seed_test_bpd"], by[ref]["per_seed_test_bpd"])]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            out.append(f"- {ds}: {lab} minus {ref}, paired by seed: {statistics.mean(diffs):+.4f} ± {sd:.4f} bpd "
                       f"({'learning improves' if max(diffs) < 0 else 'no consistent gain'} over its start)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--processes", nargs="*", default=None, help=f"subset of {list(PROCESSES)}")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one CPU thread each)")
    ap.add_argument("--workdir", default="/tmp/mdmsearch-lvf")
    args = ap.parse_args()
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist"])
    labels = args.processes or list(PROCESSES)
    unknown = [lab for lab in labels if lab not in PROCESSES]
    if unknown:
        ap.error(f"unknown process label(s) {unknown}; available: {list(PROCESSES)}")
    # full mode on CPU: an MNIST step costs ~5x a digits step (2000 digits steps ~ 65 s, 600 MNIST ~ 100 s
    # per run at one thread); on a GPU pass --steps for converged models
    steps_for = {ds: args.steps or (300 if args.quick else FULL_STEPS.get(ds, 2000)) for ds in datasets}
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(ds, lab, s) for ds in datasets for lab in labels for s in seeds]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(run_one, job[0], PROCESSES[job[1]], job[2], steps_for[job[0]],
                                    str(Path(args.workdir) / job[0] / job[1].replace(" ", "_") / str(job[2])))
                   for job in jobs}
        results = {job: f.result() for job, f in futures.items()}
    rows, lines = [], []
    for ds in datasets:
        ds_rows = [summarize(ds, lab, [results[(ds, lab, s)] for s in seeds], steps_for[ds]) for lab in labels]
        for r in ds_rows:
            print({k: r[k] for k in ("dataset", "process", "test_bpd", "test_std")}, flush=True)
        rows += ds_rows
        lines += verdicts(ds, ds_rows)
    table = md_table(rows, ["dataset", "process", "test_bpd", "test_std", "n", "heldout_bpd", "train_seconds", "steps"],
                     {"test_bpd": "{:.4f}", "test_std": "{:.4f}", "heldout_bpd": "{:.4f}", "train_seconds": "{:.1f}"})
    note = ("test_bpd: mean over seeds of the test split BPD; heldout_bpd: validation and test splits together "
            "(equal sizes; for MNIST the 2000 examples outside the 8000 training ones). Same tiny U-Net, "
            f"steps {steps_for}, batch 64, lr 2e-3, process lr 1e-2, VP-weighted t, seeds {seeds}.")
    name = "learned_vs_fixed" + ("_" + "_".join(args.datasets) if args.datasets else "") + ("_quick" if args.quick else "")
    print(write(name, {"rows": rows, "seeds": seeds, "steps": steps_for, "verdicts": lines, "threads_per_run": 1,
                       "parallel_runs": args.jobs},
                table + "\n\n" + "\n".join(lines) + "\n\n" + note))


if __name__ == "__main__":
    main()
