"""Do trained learned processes collapse to a smaller effective structure?  (issue 33)

Trains learned configurations of the aux3 space (tiny U-Net, Gaussian-residual parameterization,
batch 64, lr 2e-3, VP-weighted t, gamma 0.01, beta_1 10) and reads the coupling of their
reported (EMA) process from metrics.json (docs/math.md section 9): the auxiliaries' share of the
precision about x0, the effective K and structure.  Three questions, each a group of runs:

* the default initialization (U = -1 on free Q entries, D = I on its free diagonal) on digits at
  1000 steps, over K, the Q and D patterns and the process learning rate;
* the initialization: the same structures started at CLD (K = 1) or MALDA (K = 2);
* the budget: a subset again at 4000 steps;
* MNIST (8000 training images of the official 10k test split, 1000 validation) at 1000 steps.

It also reads the coupling off the learned Q and D stored by earlier benchmarks
(learned_vs_fixed_*.json, seed 0), which costs no training.

    python benchmarks/coupling_collapse.py --jobs 2                 # everything (about 30 min on 2 cores)
    python benchmarks/coupling_collapse.py --groups init --jobs 2   # one group
    python benchmarks/coupling_collapse.py --quick                  # two short runs (a smoke test)
    python benchmarks/coupling_collapse.py --finished-only          # the report of the runs finished so far

Finished runs in --workdir are read back, so an interrupted benchmark continues.  Writes
reports/benchmarks/coupling_collapse.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from _common import OUT, ROOT, md_table, write

MNIST = {"name": "mnist", "data_dir": str(ROOT.parent / "shared" / "data" / "mnist"),
         "n_train": 8000, "n_val": 1000, "n_test": 1000}


def _run(dataset: str, k: int, q: str, d: str, plr: float, steps: int = 1000, init: str | None = None) -> dict:
    return {"dataset": dataset, "n_aux": k, "q_pattern": q, "d_pattern": d, "process_lr": plr, "steps": steps,
            "init": init or "default"}


def groups() -> dict[str, list[dict]]:
    """The runs of each question (a run shared by two groups is trained once)."""
    # (K = 1: Q chain and Q full are the same structure, one entry x-v1)
    default = [_run("digits", k, q, d, 0.03) for k in (1, 2, 3) for q in ("chain", "full") for d in ("diag", "full")
               if k > 1 or q == "chain"]
    default += [_run("digits", k, "chain", "diag", 0.003) for k in (1, 2, 3)]
    init = [_run("digits", 1, "chain", "full", 0.03, init="cld")]
    init += [_run("digits", 2, "full", d, 0.03, init="malda") for d in ("diag", "full")]
    budget = [_run("digits", 3, "chain", "diag", 0.03, 4000), _run("digits", 2, "full", "full", 0.03, 4000),
              _run("digits", 1, "chain", "full", 0.03, 4000), _run("digits", 2, "full", "full", 0.03, 4000, "malda")]
    mnist = [_run("mnist", 3, "chain", "diag", 0.03), _run("mnist", 2, "full", "full", 0.03),
             _run("mnist", 2, "full", "full", 0.03, init="malda")]
    return {"default": default, "init": init, "budget": budget, "mnist": mnist}


def name_of(run: dict) -> str:
    return (f"{run['dataset']}-K{run['n_aux']}-{run['q_pattern']}-{run['d_pattern']}-plr{run['process_lr']:g}"
            f"-{run['init']}-{run['steps']}")


def train_one(run: dict, out: str, quick: bool = False) -> dict:
    """One training run in a worker process (one torch thread); read back when finished."""
    import torch

    from mdmsearch.config import parse_run_config
    from mdmsearch.training import Trainer

    torch.set_num_threads(1)
    out = Path(out)
    if not (out / "metrics.json").is_file():
        proc = {"name": "learned", "n_aux": run["n_aux"], "q_mask": run["q_pattern"], "d_mask": run["d_pattern"],
                "d_param": "full", "gamma": 0.01, "beta_1": 10.0}
        if run["init"] != "default":
            proc["init"] = run["init"]
        steps = 40 if quick else run["steps"]
        data = MNIST if run["dataset"] == "mnist" else {"name": "digits"}
        cfg = parse_run_config({
            "process": proc, "data": data, "model": {"name": "unet", "size": "tiny", "parameterization": "mixed"},
            "optim": {"batch_size": 64, "lr": 2e-3, "process_lr": run["process_lr"]},
            "train": {"steps": steps, "eval_every": max(1, steps // 4), "eval_examples": 270 if not quick else 64,
                      "seed": 0, "n_samples": 0, "progress": False, "time_sampler": "vp", "eval_n_t": 4,
                      "test_n_t": 8},
        })
        Trainer(cfg, out).fit()
    m = json.loads((out / "metrics.json").read_text())
    hist = json.loads((out / "coupling.json").read_text())
    return {**run, "val_bpd": m["val_bpd"], "train_seconds": m["train_seconds"], "end": _recomputed(m["Q"], m["D"]),
            "start": hist["start"], "trajectory": [(h["step"], h["share"], h["n_eff"]) for h in hist["history"]],
            "Q": m["Q"], "D": m["D"]}


def _recomputed(q, d) -> dict:
    """The coupling of stored Q, D with the current code, at these runs' process settings
    (linear beta 0.1 -> 10, gamma 0.01, S_inf = I)."""
    import torch

    from mdmsearch.diffusion.coupling import coupling, time_grid
    from mdmsearch.diffusion.schedules import make_schedule

    big_b = make_schedule("linear", beta_0=0.1, beta_1=10.0).integral(time_grid())
    return coupling(torch.tensor(q), torch.tensor(d), big_b=big_b).to_dict()


def row_of(r: dict) -> dict:
    q, d = r["Q"], r["D"]
    n = len(q)
    return {"run": name_of(r), "dataset": r["dataset"], "K": r["n_aux"], "Q": r["q_pattern"], "D": r["d_pattern"],
            "plr": r["process_lr"], "init": r["init"], "steps": r["steps"], "val_bpd": r["val_bpd"],
            "share_start": r["start"]["share"], "share_end": r["end"]["share"], "K_eff": r["end"]["n_eff"],
            "effective": r["end"]["label"], "collapsed": "yes" if r["end"]["collapsed"] else "no",
            "max_Qxv": max((abs(q[0][j]) for j in range(1, n)), default=0.0),
            "max_Dxv": max((abs(d[0][j]) for j in range(1, n)), default=0.0),
            "D_xx": d[0][0], "train_seconds": r["train_seconds"]}


def share_table(rows: list[dict], key) -> list[dict]:
    """Collapsed share by ``key`` (a function of a row): n, collapsed, share, mean aux share at the end."""
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return [{"group": g, "n": len(rs), "collapsed": sum(r["collapsed"] == "yes" for r in rs),
             "share": f"{sum(r['collapsed'] == 'yes' for r in rs) / len(rs):.0%}",
             "median aux share (end)": statistics.median(r["share_end"] for r in rs),
             "mean K_eff / K": statistics.mean(r["K_eff"] / r["K"] for r in rs)} for g, rs in out.items()]


def earlier_runs() -> list[dict]:
    """The coupling of the learned Q, D (seed 0) that earlier benchmarks stored, at their process
    defaults (linear beta 0.1 -> 10, gamma 0.01, S_inf = I)."""
    import torch

    from mdmsearch.diffusion.coupling import coupling, time_grid
    from mdmsearch.diffusion.schedules import make_schedule

    big_b = make_schedule("linear", beta_0=0.1, beta_1=10.0).integral(time_grid())
    rows = []
    for path in sorted(OUT.glob("learned_vs_fixed_*.json")):
        data = json.loads(path.read_text())
        for r in data["rows"]:
            if not r["process"].startswith("learned") or len(r["Q_seed0"]) < 2:
                continue
            c = coupling(torch.tensor(r["Q_seed0"]), torch.tensor(r["D_seed0"]), big_b=big_b)
            rows.append({"source": path.stem, "process": r["process"], "variant": r["variant"], "steps": r["steps"],
                         "K": c.n_aux, "K_eff": c.n_eff, "aux share": c.share, "effective": c.label,
                         "collapsed": "yes" if c.collapsed else "no"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", nargs="*", default=None, help="subset of default, init, budget, mnist")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one CPU thread each)")
    ap.add_argument("--workdir", default="/tmp/mdmsearch-coupling", help="finished runs here are reused")
    ap.add_argument("--quick", action="store_true", help="two 40-step runs into --workdir/quick (a smoke test)")
    ap.add_argument("--finished-only", action="store_true",
                    help="report the runs already finished in --workdir, train nothing (the rest is listed as not run)")
    args = ap.parse_args()
    plan = groups()
    chosen = args.groups or list(plan)
    if args.quick:
        plan = {"quick": [_run("digits", 1, "chain", "diag", 0.03), _run("digits", 2, "full", "full", 0.03, init="malda")]}
        chosen, args.workdir = ["quick"], str(Path(args.workdir) / "quick")
    runs = {name_of(r): r for g in chosen for r in plan[g]}
    missing = []
    if args.finished_only:
        missing = [n for n in runs if not (Path(args.workdir) / n / "metrics.json").is_file()]
        runs = {n: r for n, r in runs.items() if n not in missing}
        plan = {g: [r for r in rs if name_of(r) not in missing] for g, rs in plan.items()}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {n: pool.submit(train_one, r, str(Path(args.workdir) / n), args.quick) for n, r in runs.items()}
        results = {n: f.result() for n, f in futures.items()}
    rows = {n: row_of(r) for n, r in results.items()}
    per_group = {g: [rows[name_of(r)] for r in plan[g]] for g in chosen}
    tables = {
        "by group": share_table([{**r, "g": g} for g in chosen for r in per_group[g]], lambda r: r["g"]),
        "by init (digits, 1000 steps, the structures started at CLD / MALDA)": share_table(
            [r for r in rows.values() if r["dataset"] == "digits" and r["steps"] == 1000 and r["plr"] == 0.03
             and (r["K"], r["Q"], r["D"]) in {(b["K"], b["Q"], b["D"]) for b in rows.values() if b["init"] != "default"}],
            lambda r: f"K={r['K']} init {r['init']}"),
        "by budget (digits, the same structures)": share_table(
            [r for r in rows.values() if r["dataset"] == "digits"
             and any(b["run"].rsplit("-", 1)[0] == r["run"].rsplit("-", 1)[0] for b in rows.values() if b["steps"] == 4000)],
            lambda r: f"{r['steps']} steps"),
        "by K (default init, digits 1000 steps)": share_table(
            [r for r in per_group.get("default", [])], lambda r: f"K={r['K']}"),
        "by process_lr (default init, Q chain, D diag, digits 1000 steps)": share_table(
            [r for r in per_group.get("default", []) if r["Q"] == "chain" and r["D"] == "diag"],
            lambda r: f"process_lr {r['plr']:g}"),
    }
    earlier = earlier_runs()
    cols = ["run", "val_bpd", "share_start", "share_end", "K_eff", "effective", "max_Qxv", "max_Dxv", "D_xx",
            "train_seconds"]
    fmt = {c: "{:.4f}" for c in ("val_bpd", "share_start", "share_end", "max_Qxv", "max_Dxv", "D_xx")}
    fmt["train_seconds"] = "{:.0f}"
    tfmt = {"median aux share (end)": "{:.4f}", "mean K_eff / K": "{:.2f}"}
    md = [f"## {title}\n\n" + md_table(t, ["group", "n", "collapsed", "share", "median aux share (end)",
                                           "mean K_eff / K"], tfmt) for title, t in tables.items() if t]
    md.append("## runs\n\n" + md_table(sorted(rows.values(), key=lambda r: r["run"]), cols, fmt))
    if earlier:
        md.append("## learned Q, D of earlier benchmarks (seed 0)\n\n" + md_table(
            earlier, ["source", "process", "variant", "steps", "K", "K_eff", "aux share", "effective", "collapsed"],
            {"aux share": "{:.4f}"}))
    if missing:
        md.append("Not run (the benchmark was stopped before them; `--finished-only`): " + ", ".join(missing) + ".")
    md.append("aux share: the auxiliaries' share of the precision about x0 (mean over t of 1 - J_x / J_all, "
              "docs/math.md section 9); collapsed: effective K < K (threshold 1% of the precision). One seed per "
              "run; digits validation split 270 images, MNIST 1000.")
    name = "coupling_collapse_quick" if args.quick else "coupling_collapse"
    print(write(name, {"groups": chosen, "not_run": missing, "rows": list(rows.values()), "tables": tables, "earlier": earlier,
                       "trajectories": {n: r["trajectory"] for n, r in results.items()}}, "\n\n".join(md)))


if __name__ == "__main__":
    main()
