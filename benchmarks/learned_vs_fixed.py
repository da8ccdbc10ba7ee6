"""Learned vs fixed diffusions at CPU scale (the paper's claim, small).

Trains VPSDE, CLD, ALDA, MALDA and learned K = 1, 2, 3 with the same network and step budget,
several seeds each, on sklearn digits and on the MNIST 10k test split in ../shared/data/mnist
(fixed seeded split: train 8000, evaluate on the other 2000 = validation 1000 + test 1000),
and reports test BPD mean ± std and whether a learned process beats the best fixed one.

    python benchmarks/learned_vs_fixed.py --quick          # digits only, 1 seed, short
    python benchmarks/learned_vs_fixed.py                  # digits + mnist, 3 seeds
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from _common import ROOT, md_table, write

from mdmsearch.config import parse_run_config
from mdmsearch.training import Trainer

PROCESSES = [("VPSDE", {"name": "vpsde"}), ("CLD", {"name": "cld"}), ("ALDA", {"name": "alda"}),
             ("MALDA", {"name": "malda"}), ("learned K=1", {"name": "learned", "n_aux": 1}),
             ("learned K=2", {"name": "learned", "n_aux": 2}), ("learned K=3", {"name": "learned", "n_aux": 3})]


def data_cfg(name: str) -> dict:
    if name == "mnist":
        return {"name": "mnist", "data_dir": str(ROOT.parent / "shared" / "data" / "mnist"),
                "n_train": 8000, "n_val": 1000, "n_test": 1000}
    return {"name": name}


def run_one(dataset: str, proc: dict, seed: int, steps: int, out: Path) -> dict:
    cfg = parse_run_config({
        "process": proc, "data": data_cfg(dataset), "model": {"name": "unet", "size": "tiny"},
        "optim": {"batch_size": 64, "lr": 2e-3, "process_lr": 1e-2},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 1000, "seed": seed, "n_samples": 0,
                  "progress": False, "time_sampler": "vp"},
    })
    m = Trainer(cfg, out).fit()
    return {"val_bpd": m["val_bpd"], "test_bpd": m["test_bpd"], "train_seconds": m["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist"])
    steps = args.steps or (300 if args.quick else 2000)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    rows, verdicts = [], []
    for ds in datasets:
        ds_rows = []
        for label, proc in PROCESSES:
            runs = [run_one(ds, proc, s, steps, Path("/tmp/mdmsearch-lvf") / ds / label.replace(" ", "_") / str(s))
                    for s in seeds]
            test = [r["test_bpd"] for r in runs]
            row = {"dataset": ds, "process": label, "test_bpd": statistics.mean(test),
                   "test_std": statistics.stdev(test) if len(test) > 1 else float("nan"), "n": len(test),
                   "val_bpd": statistics.mean(r["val_bpd"] for r in runs),
                   "train_seconds": statistics.mean(r["train_seconds"] for r in runs), "steps": steps}
            ds_rows.append(row)
            print(row, flush=True)
        best_fixed = min((r for r in ds_rows if not r["process"].startswith("learned")), key=lambda r: r["test_bpd"])
        best_learned = min((r for r in ds_rows if r["process"].startswith("learned")), key=lambda r: r["test_bpd"])
        margin = best_fixed["test_bpd"] - best_learned["test_bpd"]
        verdicts.append(f"- {ds}: best learned {best_learned['process']} {best_learned['test_bpd']:.4f} vs best fixed "
                        f"{best_fixed['process']} {best_fixed['test_bpd']:.4f}: learned "
                        f"{'beats' if margin > 0 else 'does not beat'} fixed by {margin:+.4f} bpd")
        rows += ds_rows
    table = md_table(rows, ["dataset", "process", "test_bpd", "test_std", "n", "val_bpd", "train_seconds", "steps"],
                     {"test_bpd": "{:.4f}", "test_std": "{:.4f}", "val_bpd": "{:.4f}", "train_seconds": "{:.1f}"})
    name = "learned_vs_fixed" + ("_" + "_".join(args.datasets) if args.datasets else "")
    print(write(name, {"rows": rows, "seeds": seeds, "steps": steps, "verdicts": verdicts},
                table + "\n\n" + "\n".join(verdicts)))


if __name__ == "__main__":
    main()
