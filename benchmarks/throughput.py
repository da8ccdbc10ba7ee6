"""Training-step throughput per process, and the overhead of the process machinery.

For VPSDE, CLD, MALDA and learned K = 1, 2, 3 with the same U-Net, measures (in one run, so
ratios are comparable on a noisy machine):
  * a whole training step: ELBO (kernel, Cholesky, t-sampling, terms) + backward + optimizer;
  * the score network's own forward + backward + optimizer on the same input shape;
  * their ratio (target: <= 1.05 for learned K = 3 at MNIST size, batch 128).

    python benchmarks/throughput.py --quick     # digits-size only, few repeats
    python benchmarks/throughput.py             # digits and MNIST size
"""

from __future__ import annotations

import argparse

import torch

from _common import md_table, timeit_pair, write

from mdmsearch.config import parse_run_config
from mdmsearch.data import DataBundle
from mdmsearch.training import Trainer
from mdmsearch.training.trainer import make_optimizer

PROCESSES = [("vpsde", {"name": "vpsde"}), ("cld", {"name": "cld"}), ("malda", {"name": "malda"}),
             ("learned K=1", {"name": "learned", "n_aux": 1}), ("learned K=2", {"name": "learned", "n_aux": 2}),
             ("learned K=3", {"name": "learned", "n_aux": 3})]
TARGETS = {"mnist": 1.05, "digits": 1.15}  # whole step / network step, learned K = 3
SIZES = {"digits": ((1, 8, 8), 17, 64, "tiny"), "mnist": ((1, 28, 28), 256, 128, "small")}


def fake_bundle(shape, levels, n=512) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    pix = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.int64).to(torch.uint8)
    return DataBundle(name="bench", shape=tuple(shape), levels=levels, train=pix, val=pix[:64], test=pix[:64])


def measure(size: str, proc: dict, repeats: int, device: str, parameterization: str = "eps") -> dict:
    shape, levels, batch, net_size = SIZES[size]
    cfg = parse_run_config({"process": proc, "model": {"name": "unet", "size": net_size,
                                                       "parameterization": parameterization},
                            "optim": {"batch_size": batch}, "train": {"device": device, "progress": False,
                                                                      "n_samples": 0}})
    tr = Trainer(cfg, "/tmp/mdmsearch-bench", data=fake_bundle(shape, levels))
    z = torch.randn(batch, tr.process.n, *shape, device=tr.device)
    t = torch.rand(batch, device=tr.device)
    opt = make_optimizer([{"params": list(tr.net.parameters()), "lr": 1e-4}], 0.0, tr.device)  # the trainer's

    def net_only():
        opt.zero_grad(set_to_none=True)
        tr.net(z, t).square().mean().backward()
        opt.step()

    # interleaved, one call of each per round: drift of a shared machine hits both alike
    step, net = timeit_pair(tr.train_step, net_only, repeats)
    return {"size": size, "process": proc.get("name") + (f" K={proc['n_aux']}" if "n_aux" in proc else ""),
            "parameterization": parameterization, "batch": batch, "step_s": step, "net_s": net, "steps_per_s": 1.0 / step, "ratio": step / net}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parameterizations", nargs="*", default=["eps", "mixed"], choices=["eps", "mixed"])
    ap.add_argument("--sizes", nargs="*", default=None, choices=sorted(SIZES))
    ap.add_argument("--mnist-repeats", type=int, default=None,
                    help="timed pairs per MNIST-size entry (default 5; one step takes seconds on CPU and "
                         "single steps jitter by a few percent, so more pairs give a steadier median)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or (["digits"] if args.quick else ["digits", "mnist"])
    repeats = 5 if args.quick else 15
    rows = []
    for size in sizes:
        for label, proc in PROCESSES:
            for par in args.parameterizations:
                reps = repeats if size == "digits" else (args.mnist_repeats or max(3, repeats // 3))
                r = measure(size, proc, reps, args.device, par)
                r["process"] = label
                rows.append(r)
                print(f"{size:7s} {label:12s} {par:6s} step {r['step_s'] * 1e3:8.1f} ms  net {r['net_s'] * 1e3:8.1f} ms"
                      f"  ratio {r['ratio']:.3f}", flush=True)
    table = md_table(rows, ["size", "process", "parameterization", "batch", "steps_per_s", "step_s", "net_s", "ratio"],
                     {"steps_per_s": "{:.2f}", "step_s": "{:.4f}", "net_s": "{:.4f}", "ratio": "{:.3f}"})
    lines = []
    for size, bound in TARGETS.items():
        for r in rows:
            if r["size"] == size and r["process"] == "learned K=3":
                lines.append(f"Target (learned K=3, {size} size, {r['parameterization']}): ratio {r['ratio']:.3f} -> "
                             f"{'met' if r['ratio'] <= bound else 'MISSED'} (<= {bound}).")
    note = "\n\n" + "\n".join(lines) if lines else ""
    path = write("throughput" + ("_quick" if args.quick else ""), {"rows": rows, "quick": args.quick, "repeats": repeats,
                                                                  "mnist_repeats": args.mnist_repeats},
                 table + note)
    print(path)


if __name__ == "__main__":
    main()
