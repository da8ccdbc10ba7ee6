"""Calibration of the comparison verdicts with real training runs: how often does each rule
call two groups of seeds of the SAME configuration different (false verdicts), and how often
does it find a real difference between two configurations?

Trains many seeds of one configuration A and as many of a configuration B that is modestly
but really different (cheap: a 2-D toy with the tiny MLP; the final evaluation uses many
held-out examples and stratified time samples, so that its SE is small and seed-to-seed
variation dominates, as on digits).  From these runs it forms many random comparisons of
disjoint seed groups with k seeds per side and records

* the structure verdict (``compare_structures``: a t test over seeds), and
* the old rule, a model comparison of the groups' per-example seed means
  (``paired(seed_mean(group_a), seed_mean(group_b)).verdict``: 2 example-paired SE),

for A vs A (and B vs B; every better/worse is false), A vs B with disjoint seeds (Welch) and
A vs B paired by seed (the same seed numbers on both sides).  The comparisons share runs, so
the rates are estimates from ``--seeds`` runs per configuration, not from ``--splits``
independent experiments.

    python benchmarks/calibration.py --quick
    python benchmarks/calibration.py              # reports/benchmarks/calibration.{json,md}
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _common import md_table, write

from mdmsearch.compare import TIE, compare_structures, paired, seed_mean

DECIDED = ("better", "worse")

# the configuration both sides share; A and B differ by VARIANTS[...]
BASE = {
    "process": {"name": "vpsde"},
    "data": {"name": "8gaussians", "seed": 0, "n_train": 4096, "n_val": 2048, "n_test": 2048},
    "model": {"name": "mlp", "size": "tiny"},
    "optim": {"batch_size": 128, "lr": 2e-3, "warmup": 20, "ema": 0.99},
    "train": {"steps": 300, "eval_examples": 128, "eval_n_t": 1, "test_n_t": 32, "n_samples": 0,
              "progress": False, "device": "cpu"},
}
# candidate B's (the gap each one makes is measured, not assumed)
VARIANTS = {
    "A": {},
    "steps450": {"train": {"steps": 450}},
    "steps600": {"train": {"steps": 600}},
    "lr1e-3": {"optim": {"lr": 1e-3}},
    "lr4e-3": {"optim": {"lr": 4e-3}},
    "lr8e-3": {"optim": {"lr": 8e-3}},
    "cld": {"process": {"name": "cld"}},
    "alda": {"process": {"name": "alda"}},
    "malda": {"process": {"name": "malda"}},
}


def run_config(variant: str, seed: int, steps_scale: float = 1.0) -> dict:
    cfg = {sec: dict(v) for sec, v in BASE.items()}
    for sec, over in VARIANTS[variant].items():
        cfg[sec] = {**cfg[sec], **over}
    cfg["train"]["steps"] = max(1, int(round(cfg["train"]["steps"] * steps_scale)))
    cfg["train"]["eval_every"] = cfg["train"]["steps"]  # one validation, at the end
    cfg["train"]["seed"] = int(seed)
    return cfg


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _train(job: tuple) -> tuple[str, int, np.ndarray, float]:
    """Train one run; its held-out per-example BPDs (validation then test) and seconds."""
    import logging

    logging.disable(logging.INFO)
    from mdmsearch.compare import read_per_example
    from mdmsearch.config import parse_run_config
    from mdmsearch.training import Trainer

    variant, seed, cfg, out = job
    t0 = time.perf_counter()
    Trainer(parse_run_config(cfg, f"{variant} seed {seed}"), out).fit()
    per = read_per_example(out)
    shutil.rmtree(out, ignore_errors=True)  # the per-example BPDs are all this benchmark keeps
    return variant, seed, per, time.perf_counter() - t0


def train_all(jobs: list[tuple], workers: int) -> tuple[dict, list[float]]:
    """{variant: {seed: per-example array}} and the seconds of every run."""
    runs: dict = {}
    secs: list[float] = []
    if workers <= 1:
        _init_worker()
        results = map(_train, jobs)
        return _collect(results, runs, secs, len(jobs))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
        return _collect(ex.map(_train, jobs), runs, secs, len(jobs))


def _collect(results, runs: dict, secs: list, total: int):
    for i, (variant, seed, per, sec) in enumerate(results, 1):
        if per is None:
            raise RuntimeError(f"{variant} seed {seed}: no per-example results")
        runs.setdefault(variant, {})[seed] = per
        secs.append(sec)
        if i % 10 == 0 or i == total:
            print(f"  trained {i}/{total} runs ({sec:.1f} s the last)", flush=True)
    return runs, secs


# ---------------------------------------------------------------------- analysis
def _old_verdict(a: dict, b: dict) -> str:
    c = paired(seed_mean(a.values()), seed_mean(b.values()))
    return c.verdict if c is not None else TIE


def _new_verdict(a: dict, b: dict) -> str:
    c = compare_structures(a, b)
    return c.verdict if c is not None else TIE


def _splits(rng: np.random.Generator, seeds: list, k: int, n: int, groups: int = 2) -> list[list[list]]:
    """``n`` random draws of ``groups`` disjoint groups of ``k`` seeds each."""
    out = []
    for _ in range(n):
        pick = rng.choice(seeds, size=groups * k, replace=False).tolist()
        out.append([sorted(pick[g * k:(g + 1) * k]) for g in range(groups)])
    return out


def _rates(verdicts: list[str], expected: str | None) -> dict:
    """Share of decided verdicts (better/worse), and of the expected / the wrong sign."""
    n = len(verdicts)
    decided = sum(v in DECIDED for v in verdicts)
    out = {"n": n, "decided": decided / n}
    if expected is not None:
        wrong = "better" if expected == "worse" else "worse"
        out["right"] = sum(v == expected for v in verdicts) / n
        out["wrong"] = sum(v == wrong for v in verdicts) / n
    return out


def analyse(runs: dict, a: str, b: str, ks: list[int], n_splits: int, seed: int = 0) -> dict:
    ra, rb = runs[a], runs[b]
    common = sorted(set(ra) & set(rb))
    ma = np.array([ra[s].mean() for s in sorted(ra)])
    mb = np.array([rb[s].mean() for s in sorted(rb)])
    sd_a, sd_b = float(ma.std(ddof=1)), float(mb.std(ddof=1))
    sd_pooled = math.sqrt((sd_a ** 2 + sd_b ** 2) / 2)
    # evaluation noise: example-paired SE of one run against another (same configuration)
    seeds_a = sorted(ra)
    se_pairs = [paired(ra[seeds_a[i]], ra[seeds_a[i + 1]]).se for i in range(0, len(seeds_a) - 1, 2)]
    se_ab = [paired(ra[s], rb[s]).se for s in common]
    se_ex = float(np.median(se_pairs))
    gap = float(mb.mean() - ma.mean())  # B minus A (negative: B is better)
    gap_se = math.sqrt(sd_a ** 2 / ma.size + sd_b ** 2 / mb.size)
    d_seed = np.array([rb[s].mean() - ra[s].mean() for s in common])
    expected_ab = "better" if gap > 0 else "worse"  # verdict of A vs B (A minus B) for the real gap
    summary = {
        "config_a": a, "config_b": b, "n_seeds_a": len(ra), "n_seeds_b": len(rb),
        "n_examples": int(next(iter(ra.values())).size),
        "mean_a": float(ma.mean()), "mean_b": float(mb.mean()),
        "seed_sd_a": sd_a, "seed_sd_b": sd_b, "seed_sd_pooled": sd_pooled,
        "example_paired_se_median": se_ex, "example_paired_se_max": float(np.max(se_pairs)),
        "example_paired_se_a_vs_b_median": float(np.median(se_ab)) if se_ab else None,
        "sd_over_se": sd_pooled / se_ex,
        "true_gap": gap, "true_gap_se": gap_se, "true_gap_in_seed_sd": abs(gap) / sd_pooled,
        "seed_paired_sd": float(d_seed.std(ddof=1)) if d_seed.size > 1 else None,
        "seed_pairing_correlation": float(np.corrcoef(ma[:len(common)], mb[:len(common)])[0, 1])
        if len(common) > 2 and sorted(ra) == sorted(rb) else None,
    }
    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        for label, first, second, expected, disjoint in (
                (f"{a} vs {a}", ra, ra, None, True), (f"{b} vs {b}", rb, rb, None, True),
                (f"{a} vs {b}, disjoint seeds", ra, rb, expected_ab, True),
                (f"{a} vs {b}, paired by seed", ra, rb, expected_ab, False)):
            if disjoint:
                pool = sorted(set(first) & set(second)) if first is not second else sorted(first)
                if len(pool) < 2 * k:
                    continue
                draws = _splits(rng, pool, k, n_splits)
            else:
                if len(common) < k:
                    continue
                draws = [[g, g] for g, in _splits(rng, common, k, n_splits, groups=1)]
            new, old = [], []
            for ga, gb in draws:
                ga_runs = {s: first[s] for s in ga}
                gb_runs = {s: second[s] for s in gb}
                new.append(_new_verdict(ga_runs, gb_runs))
                old.append(_old_verdict(ga_runs, gb_runs))
            rn, ro = _rates(new, expected), _rates(old, expected)
            rows.append({"k": k, "comparison": label, "null": expected is None, "n": rn["n"],
                         "structure": rn["decided"] if expected is None else rn["right"],
                         "structure_wrong": rn.get("wrong", 0.0),
                         "old": ro["decided"] if expected is None else ro["right"],
                         "old_wrong": ro.get("wrong", 0.0)})
            print(f"  k={k} {label}: structure {rows[-1]['structure']:.3f} (wrong {rows[-1]['structure_wrong']:.3f}), "
                  f"old {rows[-1]['old']:.3f} (wrong {rows[-1]['old_wrong']:.3f})", flush=True)
    return {"summary": summary, "rows": rows, "expected_a_vs_b": expected_ab}


def markdown(res: dict, args, seconds: float, run_secs: list[float]) -> str:
    s = res["summary"]
    a, b = s["config_a"], s["config_b"]
    cfg_a, cfg_b = run_config(a, 0, args.steps_scale), run_config(b, 0, args.steps_scale)
    diff_b = {sec: {k: v for k, v in cfg_b[sec].items() if cfg_a[sec].get(k) != v} for sec in cfg_b}
    diff_b = {sec: v for sec, v in diff_b.items() if v}
    lines = [
        f"Configuration A (`{a}`): `{cfg_a}` with train.seed = 0 .. {s['n_seeds_a'] - 1}.",
        f"Configuration B (`{b}`): A with `{diff_b}`, the same seeds.",
        "",
        f"- held-out examples per run: {s['n_examples']} (validation + test, {cfg_a['train']['test_n_t']} "
        "stratified time samples each)",
        f"- mean held-out BPD: A {s['mean_a']:.4f}, B {s['mean_b']:.4f}; true gap B - A = {s['true_gap']:+.4f} "
        f"± {s['true_gap_se']:.4f} bpd = {s['true_gap_in_seed_sd']:.1f} seed SD",
        f"- seed-to-seed SD of run means: A {s['seed_sd_a']:.4f}, B {s['seed_sd_b']:.4f} (pooled {s['seed_sd_pooled']:.4f})",
        f"- example-paired SE of one run vs another: median {s['example_paired_se_median']:.4f}, "
        f"max {s['example_paired_se_max']:.4f} bpd",
        f"- seed SD / example-paired SE = **{s['sd_over_se']:.1f}x**",
    ]
    if s["seed_paired_sd"] is not None:
        lines.append(f"- SD over seeds of the same-seed difference B - A: {s['seed_paired_sd']:.4f} "
                     f"(correlation of A's and B's run means over seeds: {s['seed_pairing_correlation']:+.2f})")
    rows = [{**r, "comparison": r["comparison"] + (" (false verdicts)" if r["null"] else " (detections)")}
            for r in res["rows"]]
    cols = ["k", "comparison", "structure", "structure_wrong", "old", "old_wrong"]
    fmt = {c: "{:.3f}" for c in cols[2:]}
    table = md_table(rows, cols, fmt)
    note = (f"k: seeds per side; {args.splits} random seed groups per row, drawn from the {s['n_seeds_a']} runs per "
            "configuration (the rows share runs: their uncertainty is that of a few dozen runs, not of "
            f"{args.splits} experiments).  structure: `compare_structures` (t test over seeds, level 0.05; "
            "Welch for disjoint seeds, paired for the same seeds); old: `paired(seed_mean(A), seed_mean(B))` "
            "(2 example-paired SE).  Null rows (X vs X, disjoint seeds): share of better/worse verdicts, all false.  "
            f"A vs B rows: share of the right verdict ({res['expected_a_vs_b']!r} for A minus B); *_wrong: share "
            "of the opposite verdict.")
    timing = (f"Runtime: {seconds:.0f} s in all; {len(run_secs)} runs, {np.median(run_secs):.1f} s each (median, "
              f"one thread per run, {args.workers} workers).")
    return "\n".join(lines) + "\n\n" + table + "\n\n" + note + "\n\n" + timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer seeds and splits (a few minutes)")
    ap.add_argument("--a", default="A", choices=sorted(VARIANTS))
    ap.add_argument("--b", default="steps450", choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 40, quick 12)")
    ap.add_argument("--splits", type=int, default=None, help="random seed groups per row (default 2000, quick 500)")
    ap.add_argument("--k", type=int, nargs="*", default=[2, 3, 5])
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every configuration's steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--name", default=None, help="report name (default calibration, quick calibration_quick)")
    args = ap.parse_args()
    n_seeds = args.seeds or (12 if args.quick else 40)
    args.splits = args.splits or (500 if args.quick else 2000)
    name = args.name or ("calibration_quick" if args.quick else "calibration")
    t0 = time.perf_counter()
    tmp = None
    work = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="mdm_calibration_"))
    try:
        jobs = [(v, s, run_config(v, s, args.steps_scale), str(work / f"{v}-{s}"))
                for s in range(n_seeds) for v in (args.a, args.b)]
        print(f"training {len(jobs)} runs ({args.a}, {args.b} x {n_seeds} seeds) in {work}", flush=True)
        runs, run_secs = train_all(jobs, args.workers)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ks = [k for k in args.k if 2 * k <= n_seeds]
    res = analyse(runs, args.a, args.b, ks, args.splits)
    seconds = time.perf_counter() - t0
    print({k: v for k, v in res["summary"].items()}, flush=True)
    table = markdown(res, args, seconds, run_secs)
    payload = {**res, "configs": {args.a: run_config(args.a, 0, args.steps_scale),
                                  args.b: run_config(args.b, 0, args.steps_scale)},
               "n_seeds": n_seeds, "splits": args.splits, "ks": ks, "workers": args.workers, "seconds": seconds,
               "run_seconds_median": float(np.median(run_secs)),
               "run_means": {v: {int(s): float(arr.mean()) for s, arr in sorted(r.items())} for v, r in runs.items()}}
    print(write(name, payload, table))


if __name__ == "__main__":
    main()
