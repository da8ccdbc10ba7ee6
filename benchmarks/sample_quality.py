"""Sample quality next to BPD on digits: VPSDE, CLD, MALDA and aux3's best learned structure
(K = 3, chain Q, diagonal D), trained with 3 seeds each at aux3's budget, each model's samples
scored (KID, FID against the training split, the digits classifier's features) at two NFE
budgets of the EM sampler from the same noise (common random numbers), with verdicts over seeds
against VPSDE for both BPD (test split, per example) and KID.

    python benchmarks/sample_quality.py [--steps 1000] [--seeds 0 1 2] [--nfe 20 100] [--jobs 2]

Writes reports/benchmarks/sample_quality.{json,md}."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _common import md_table, write

PROCESSES = {
    "VPSDE": {"name": "vpsde"},
    "CLD": {"name": "cld"},
    "MALDA": {"name": "malda"},
    "learned K=3 chain/diag": {"name": "learned", "n_aux": 3, "q_mask": "chain", "d_mask": "diag", "gamma": 0.01},
}
LEARNED_HYPER = {"optim": {"process_lr": 0.03}, "train": {"time_sampler": "adaptive"}}  # aux3's winner


def _config(process: dict, seed: int, steps: int) -> dict:
    learned = process["name"] == "learned"
    return {
        "process": process, "data": {"name": "digits"},
        "model": {"size": "tiny", "parameterization": "mixed"},
        "optim": {"batch_size": 64, "lr": 0.002, **(LEARNED_HYPER["optim"] if learned else {})},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 270, "test_n_t": 32, "seed": seed,
                  "n_samples": 0, "progress": False, **(LEARNED_HYPER["train"] if learned else {})},
    }


def _one(args: tuple) -> dict:
    """Train one (process, seed), then score its samples at every NFE budget."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mdmsearch.compare import read_per_example
    from mdmsearch.config import QualityConfig, parse_run_config
    from mdmsearch.training import Trainer
    from mdmsearch.training.inference import sample_quality

    label, process, seed, steps, nfes, n, root = args
    torch.set_num_threads(1)
    out = Path(root) / f"{label.replace(' ', '_').replace('/', '-')}-{seed}"
    trainer = Trainer(parse_run_config(_config(process, seed, steps)), out)
    t0 = time.perf_counter()
    metrics = trainer.fit()
    train_s = time.perf_counter() - t0
    row = {"label": label, "seed": seed, "val_bpd": metrics["val_bpd"], "test_bpd": metrics["test_bpd"],
           "train_seconds": train_s, "per_example": read_per_example(out, "test").tolist()}
    for nfe in nfes:
        t0 = time.perf_counter()
        q = sample_quality(trainer, QualityConfig(n=n, nfe=nfe, sampler="em"), trainer.data,
                           t_min=trainer.config.train.t_min)
        row[f"kid@{nfe}"], row[f"kid_se@{nfe}"], row[f"fid@{nfe}"] = q["kid"], q["kid_se"], q["fid"]
        row[f"quality_seconds@{nfe}"] = time.perf_counter() - t0
        row["features"] = q["features"]
    return row


def _verdicts(runs: list[dict], nfes: list[int]) -> list[dict]:
    from mdmsearch.compare import compare_structures

    by = {}
    for r in runs:
        by.setdefault(r["label"], []).append(r)
    ref = {r["seed"]: r for r in by["VPSDE"]}
    table = []
    for label, rs in by.items():
        seeds = {r["seed"]: r for r in rs}
        row = {"process": label, "seeds": len(rs), "test_bpd": float(np.mean([r["test_bpd"] for r in rs])),
               "train_s": float(np.mean([r["train_seconds"] for r in rs]))}
        if label != "VPSDE":
            c = compare_structures({s: np.array(r["per_example"]) for s, r in seeds.items()},
                                   {s: np.array(r["per_example"]) for s, r in ref.items()})
            row["bpd vs VPSDE"] = f"{c.diff:+.4f} ± {c.se:.4f} {c.verdict}" if c else "—"
        for nfe in nfes:
            kids = [r[f"kid@{nfe}"] for r in rs]
            row[f"KID@{nfe}"] = f"{np.mean(kids):.4f} ± {np.std(kids, ddof=1) / math.sqrt(len(kids)):.4f}"
            row[f"FID@{nfe}"] = f"{np.mean([r[f'fid@{nfe}'] for r in rs]):.2f}"
            if label != "VPSDE":
                c = compare_structures({s: np.array([r[f"kid@{nfe}"]]) for s, r in seeds.items()},
                                       {s: np.array([r[f"kid@{nfe}"]]) for s, r in ref.items()})
                row[f"KID@{nfe} vs VPSDE"] = f"{c.diff:+.4f} ± {c.se:.4f} {c.verdict}" if c else "—"
        table.append(row)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nfe", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--n", type=int, default=256, help="samples scored per model and budget")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdm-quality-") as root:
        jobs = [(label, proc, seed, args.steps, args.nfe, args.n, root)
                for label in PROCESSES for proc in [PROCESSES[label]] for seed in args.seeds]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(_one, jobs))
    table = _verdicts(runs, args.nfe)
    cols = ["process", "seeds", "test_bpd", "bpd vs VPSDE"] + [c for nfe in args.nfe for c in
                                                              (f"KID@{nfe}", f"KID@{nfe} vs VPSDE", f"FID@{nfe}")]
    md = (f"Digits, tiny U-Net, mixed predictor, {args.steps} steps, batch 64; {args.n} EM samples per model and "
          f"budget from common noise, scored against the training split in the features `{runs[0]['features']}`; "
          "verdicts over seeds (paired by seed, t test at 5%), lower is better.\n\n"
          + md_table(table, cols, {"test_bpd": "{:.4f}"}))
    slim = [{k: v for k, v in r.items() if k != "per_example"} for r in runs]
    print(write("sample_quality", {"args": vars(args), "runs": slim, "table": table}, md))


if __name__ == "__main__":
    main()
