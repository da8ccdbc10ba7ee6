"""Estimator variance of the per-batch ELBO under uniform, VP-weighted and process-adaptive
t-sampling, at equal sample counts, for each preset and a learned process.

Uses Gaussian data N(0.1, 0.25) in d dimensions and the exact (oracle) score, so the only
randomness is the estimator's: the bound itself is the same for every sampler.

    python benchmarks/variance.py --quick
"""

from __future__ import annotations

import argparse
import math

import torch

from _common import md_table, write

from mdmsearch.diffusion import learned, preset
from mdmsearch.objectives import GaussianOracle, elbo

MU, VAR = 0.1, 0.25


def batch_elbos(proc, scheme: str, n_batches: int, batch: int, dim: int, seed: int) -> torch.Tensor:
    oracle = GaussianOracle(proc, MU, VAR)
    gen = torch.Generator().manual_seed(seed)
    x = MU + math.sqrt(VAR) * torch.randn(n_batches * batch, dim, generator=gen, dtype=torch.float64)
    per_ex = elbo(proc, x, oracle, parameterization="score", time_sampler=scheme, generator=gen).detach()
    return per_ex.reshape(n_batches, batch).mean(dim=1) / dim  # per-batch estimate, nats/dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_batches, batch, dim = (100, 64, 16) if args.quick else (400, 128, 64)
    procs = [(n, preset(n)) for n in ("vpsde", "cld", "alda", "malda")]
    procs.append(("learned K=2", learned(2, init_noise=0.5, seed=2)))
    rows = []
    for name, proc in procs:
        stds = {}
        means = {}
        for scheme in ("uniform", "vp", "adaptive"):
            est = batch_elbos(proc, scheme, n_batches, batch, dim, seed=0)
            stds[scheme], means[scheme] = float(est.std()), float(est.mean())
        row = {"process": name, **{f"std_{k}": v for k, v in stds.items()},
               **{f"mean_{k}": v for k, v in means.items()},
               "var_reduction_vp": (stds["uniform"] / stds["vp"]) ** 2,
               "var_reduction_adaptive": (stds["uniform"] / stds["adaptive"]) ** 2}
        rows.append(row)
        print(row, flush=True)
    cols = ["process", "std_uniform", "std_vp", "std_adaptive", "var_reduction_vp", "var_reduction_adaptive",
            "mean_uniform", "mean_vp", "mean_adaptive"]
    fmt = {c: "{:.4f}" for c in cols[1:]}
    fmt.update({"var_reduction_vp": "{:.1f}x", "var_reduction_adaptive": "{:.1f}x"})
    table = md_table(rows, cols, fmt)
    note = (f"\n\nPer-batch ELBO estimates (nats/dim), {n_batches} batches of {batch} examples, d = {dim}, "
            "one t per example, exact score (Gaussian oracle); variance reduction = (std_uniform / std_scheme)^2.")
    print(write("variance", {"rows": rows, "n_batches": n_batches, "batch": batch, "dim": dim}, table + note))


if __name__ == "__main__":
    main()
