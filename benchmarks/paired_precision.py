"""How precisely can two finished runs be ranked?  Paired SE of held-out BPD differences vs the
number of stratified time samples, and what it costs.

For every run directory given (trained models of one dataset), evaluates the pooled held-out
examples (validation + test) with n_t stratified time samples per example, twice, with two
evaluation seeds (common random numbers within a seed).  For each pair of runs it reports
the paired SE of their difference at each n_t, and the floor that no number of time samples
removes: the part of the per-example difference that is real (the covariance of the
differences measured under the two independent seeds), i.e. sqrt(cov / n_examples).

    python benchmarks/paired_precision.py RUN_DIR [RUN_DIR ...] --n-t 32 128
    python benchmarks/paired_precision.py --lvf-workdir /work/lvf --dataset digits --seed-run 2000-0
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch

from _common import md_table, write


def held_out(trainer):
    return torch.cat([trainer.data.val, trainer.data.test])


def evaluate(run_dir: Path, n_t: int, seed: int) -> tuple[torch.Tensor, float]:
    from mdmsearch.cli import _load_trainer
    from mdmsearch.training.evaluate import evaluate_bpd

    tr = _load_trainer(str(run_dir))
    t0 = time.perf_counter()
    tr.net.eval()
    with tr.ema.applied():
        res = evaluate_bpd(tr.process, tr.model, held_out(tr), tr.data.levels, time_sampler=tr.eval_sampler,
                           batch_size=256, n_t=n_t, seed=seed, device=tr.device, return_all=True)
    return res["per_example"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="*", help="run directories (with checkpoint.pt)")
    ap.add_argument("--lvf-workdir", default=None, help="take the runs from a learned_vs_fixed work directory")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seed-run", default="2000-0", help="run sub-directory name in the learned_vs_fixed layout")
    ap.add_argument("--n-t", nargs="*", type=int, default=[32, 128])
    ap.add_argument("--seeds", nargs=2, type=int, default=[12345, 777])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.runs]
    if args.lvf_workdir:
        runs += sorted(Path(args.lvf_workdir, args.dataset).glob(f"*/*/{args.seed_run}"))
    runs = [r for r in runs if (r / "checkpoint.pt").is_file()]
    if len(runs) < 2:
        ap.error("need at least two run directories with a checkpoint")
    names = {r: f"{r.parent.parent.name} [{r.parent.name}] {r.name}" for r in runs}  # process [variant] run
    per: dict = {}
    cost: dict = {}
    for n_t in args.n_t:
        for r in runs:
            for s in args.seeds:
                per[(r, n_t, s)], sec = evaluate(r, n_t, s)
                cost.setdefault(n_t, []).append(sec)
            print(f"n_t={n_t} {names[r]}: {float(per[(r, n_t, args.seeds[0])].mean()):.4f}", flush=True)
    rows = []
    s1, s2 = args.seeds
    for a, b in itertools.combinations(runs, 2):
        row = {"a": names[a], "b": names[b]}
        for n_t in args.n_t:
            d1 = per[(a, n_t, s1)] - per[(b, n_t, s1)]
            d2 = per[(a, n_t, s2)] - per[(b, n_t, s2)]
            n = d1.numel()
            row[f"diff@{n_t}"] = float(d1.mean())
            row[f"se@{n_t}"] = float(d1.std() / math.sqrt(n))
            cov = float(((d1 - d1.mean()) * (d2 - d2.mean())).mean())
            row[f"floor@{n_t}"] = math.sqrt(max(cov, 0.0) / n)
        rows.append(row)
    cols = ["a", "b"] + [f"{k}@{n}" for n in args.n_t for k in ("diff", "se", "floor")]
    fmt = {c: "{:+.4f}" if c.startswith("diff") else "{:.4f}" for c in cols[2:]}
    table = md_table(rows, cols, fmt)
    n_ex = int(per[(runs[0], args.n_t[0], s1)].numel())
    lines = [f"- n_t = {n}: max paired SE {max(r[f'se@{n}'] for r in rows):.4f}, median "
             f"{sorted(r[f'se@{n}'] for r in rows)[len(rows) // 2]:.4f} bpd; evaluation of {n_ex} examples "
             f"{sum(cost[n]) / len(cost[n]):.1f} s per run (1 CPU thread)" for n in args.n_t]
    note = ("se: paired SE of the difference (one evaluation seed); floor: the part of it that is a real "
            "per-example difference between the models (covariance of the differences under two independent "
            "evaluation seeds), which more time samples cannot remove.")
    print(write(f"paired_precision_{args.dataset}", {"rows": rows, "runs": [str(r) for r in runs], "n_t": args.n_t,
                                                      "seeds": args.seeds, "n_examples": n_ex,
                                                      "seconds_per_eval": {n: cost[n] for n in cost}},
                table + "\n\n" + "\n".join(lines) + "\n\n" + note))


if __name__ == "__main__":
    main()
