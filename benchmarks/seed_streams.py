"""Where the seed variance comes from, and what common random numbers remove (issue 31, items 2-3).

Two configurations of search_spaces/aux3.yaml's space, at its network size and budget (digits,
tiny U-Net, Gaussian-residual noise predictor, batch 64, lr 0.002):

    vpsde   VPSDE (K = 0), t ~ vp                    (the baselines' fixed setting)
    winner  learned K = 3, Q chain, D diag (d_param full), process lr 0.01, gamma 0.01, t adaptive

Held-out BPD = the final test BPD (270 examples, test_n_t strata, the evaluation seed).

1. Paired differences (winner - vpsde, seeds 0..S-1, every stream = the seed), with the streams
   of earlier versions (``train.streams: shared``) and with common random numbers (``crn``): the
   SD of the per-seed differences, each configuration's seed SD and their correlation.
2. Variance budget (``crn``): one stream varied at a time (``train.seeds.<stream>`` = 0..S-1,
   the others at 0) for init, data and diffusion; the evaluation stream by re-evaluating the
   seed-0 model with evaluation seeds 12345 + 0..S-1; each stream's variance next to the variance
   with all streams varied (part 1's crn runs).

Runs go to a JSONL file as they finish (a rerun skips those done), two worker processes with one
torch thread each.

    python benchmarks/seed_streams.py --seeds 6 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor

from _common import OUT, md_table, write

STREAMS = ("init", "data", "diffusion")
EVAL_SEED = 12345
EVAL_SEEDS = 6  # evaluation seeds of the seed-0 models (the evaluation stream's variance)
CONFIGS = {
    "vpsde": {"process": {"name": "vpsde"}, "optim": {}, "train": {"time_sampler": "vp"}},
    "winner": {"process": {"name": "learned", "n_aux": 3, "q_mask": "chain", "d_mask": "diag", "d_param": "full",
                           "gamma": 0.01},
               "optim": {"process_lr": 0.01}, "train": {"time_sampler": "adaptive"}},
}


def run_config(name: str, steps: int, test_n_t: int, streams: str, seeds: dict | None, seed: int):
    from mdmsearch.config import parse_run_config

    c = CONFIGS[name]
    train = {"steps": steps, "eval_every": steps, "eval_examples": 270, "test_n_t": test_n_t, "n_samples": 0,
             "progress": False, "device": "cpu", "seed": seed, "streams": streams, **c["train"]}
    if seeds is not None:
        train["seeds"] = seeds
    return parse_run_config({"process": c["process"], "data": {"name": "digits"},
                             "model": {"name": "unet", "size": "tiny", "parameterization": "mixed"},
                             "optim": {"batch_size": 64, "lr": 0.002, **c["optim"]}, "train": train})


def job_key(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def run_job(job: dict) -> dict:
    """Train one run (or re-evaluate the seed-0 run with other evaluation seeds)."""
    import torch

    from mdmsearch.training import Trainer

    torch.set_num_threads(1)
    cfg = run_config(job["config"], job["steps"], job["test_n_t"], job["streams"], job.get("seeds"), job["seed"])
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(cfg, out)
        metrics = tr.fit()
        row = {**job, "val_bpd": metrics["val_bpd"], "test_bpd": metrics["test_bpd"],
               "train_seconds": metrics["train_seconds"]}
        if job.get("eval_seeds"):  # the evaluation stream: the same model under other evaluation seeds
            row["eval_test_bpd"] = []
            for k in range(job["eval_seeds"]):
                tr.config.train.eval_seed = EVAL_SEED + k
                tr._last_eval = None
                row["eval_test_bpd"].append(tr.evaluate("test", n_t=job["test_n_t"])["bpd"])
    return row


def jobs(n_seeds: int, steps: int, test_n_t: int) -> list[dict]:
    base = {"steps": steps, "test_n_t": test_n_t}
    out = []
    for streams in ("crn", "shared"):
        for seed in range(n_seeds):
            for name in CONFIGS:
                job = {**base, "config": name, "streams": streams, "seed": seed, "part": "paired"}
                if streams == "crn" and seed == 0:
                    job["eval_seeds"] = EVAL_SEEDS
                out.append(job)
    for value in range(1, n_seeds):  # value 0 is the all-zero run of part 1; streams interleaved (a cut run is balanced)
        for stream in STREAMS:
            for name in CONFIGS:
                seeds = {s: (value if s == stream else 0) for s in STREAMS}
                out.append({**base, "config": name, "streams": "crn", "seed": 0, "seeds": seeds, "part": stream})
    return out


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def paired(rows: list[dict], streams: str) -> dict:
    by = {(r["config"], r["seed"]): r["test_bpd"] for r in rows if r["part"] == "paired" and r["streams"] == streams}
    seeds = sorted(s for (c, s) in by if c == "winner" and ("vpsde", s) in by)
    w, v = [by["winner", s] for s in seeds], [by["vpsde", s] for s in seeds]
    diff = [a - b for a, b in zip(w, v)]
    corr = statistics.correlation(w, v) if len(seeds) > 2 else math.nan
    return {"streams": streams, "seeds": len(seeds), "mean_diff": statistics.fmean(diff) if diff else math.nan,
            "sd_diff": sd(diff), "sd_winner": sd(w), "sd_vpsde": sd(v), "corr": corr,
            "se_diff": sd(diff) / math.sqrt(len(diff)) if diff else math.nan}


def _values(rows: list[dict], name: str, part: str) -> dict:
    """value of the varied seed -> (test BPD, the evaluation-seed BPDs) of config ``name`` (or the
    per-seed difference ``winner - vpsde``) in ``part`` ("paired": crn runs, every stream = the seed)."""
    def of(config):
        keep = [r for r in rows if r["config"] == config and r["part"] == part and r["streams"] == "crn"]
        key = (lambda r: r["seed"]) if part == "paired" else (lambda r: r["seeds"][part])
        return {key(r): (r["test_bpd"], r.get("eval_test_bpd") or []) for r in keep}

    if name != "winner - vpsde":
        return of(name)
    w, v = of("winner"), of("vpsde")
    return {k: (w[k][0] - v[k][0], [a - b for a, b in zip(w[k][1], v[k][1])]) for k in w if k in v}


def budget(rows: list[dict], name: str) -> list[dict]:
    """Variance of the held-out BPD with one stream varied, and with all varied, for ``name``."""
    crn0 = _values(rows, name, "paired")
    total = [v for v, _ in crn0.values()]
    var_all = sd(total) ** 2
    out = []
    for stream in STREAMS:
        vals = [crn0[0][0]] if 0 in crn0 else []
        vals += [v for k, (v, _) in _values(rows, name, stream).items() if k != 0]
        out.append({"config": name, "stream": stream, "n": len(vals), "sd": sd(vals), "var": sd(vals) ** 2})
    ev = crn0.get(0, (None, []))[1]
    out.append({"config": name, "stream": "eval", "n": len(ev), "sd": sd(ev), "var": sd(ev) ** 2})
    for r in out:
        r["share"] = r["var"] / var_all if var_all > 0 else math.nan
    parts = sum(r["var"] for r in out if r["stream"] != "eval")
    out.append({"config": name, "stream": "sum of init, data, diffusion", "n": "", "sd": math.sqrt(parts),
                "var": parts, "share": parts / var_all if var_all > 0 else math.nan})
    out.append({"config": name, "stream": "all (every stream = the seed)", "n": len(total), "sd": sd(total),
                "var": var_all, "share": 1.0})
    return out


def report(rows: list[dict], args) -> None:
    pairs = [paired(rows, s) for s in ("shared", "crn")]
    shares = budget(rows, "vpsde") + budget(rows, "winner") + budget(rows, "winner - vpsde")
    f4 = "{:.4f}"
    t1 = md_table(pairs, ["streams", "seeds", "mean_diff", "se_diff", "sd_diff", "sd_winner", "sd_vpsde", "corr"],
                  {k: f4 for k in ("mean_diff", "se_diff", "sd_diff", "sd_winner", "sd_vpsde")} | {"corr": "{:.2f}"})
    t2 = md_table(shares, ["config", "stream", "n", "sd", "var", "share"],
                  {"sd": f4, "var": "{:.2e}", "share": "{:.2f}"})
    secs = [r["train_seconds"] for r in rows]
    note = (f"Digits, tiny U-Net, {args.steps} steps, batch 64, test BPD at test_n_t {args.test_n_t} "
            f"(270 examples, evaluation seed {EVAL_SEED}); {len(rows)} runs, "
            f"median {statistics.median(secs):.0f} s of training each.\n\n"
            "## Paired differences (winner - vpsde), per seed\n\n" + t1 +
            "\n\n## Variance budget (streams crn): one stream varied at a time\n\n" + t2 +
            "\n\nRows `winner - vpsde`: the per-seed difference of the two configurations under one seed "
            "dictionary (what a comparison paired by seed sees); its `eval` row re-evaluates the two seed-0 "
            "models with the same 6 evaluation seeds (the evaluation noise of a difference, which the "
            "fixed evaluation seed of a search turns into an offset shared by every seed)."
            "\n\nshare = the stream's variance / the variance with every stream varied; a variance of n values "
            "has n - 1 degrees of freedom (a 95% interval of a variance estimate with 5 df spans 0.39x to "
            "6.0x), so shares are rough and need not sum to 1.")
    path = write(args.name, {"steps": args.steps, "seeds": args.seeds, "test_n_t": args.test_n_t, "paired": pairs,
                             "budget": shares, "runs": rows}, note)
    print(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=6, help="seeds of part 1, and values of each stream in part 2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--test-n-t", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="seed_streams")
    ap.add_argument("--only", choices=["paired", "all"], default="all", help="paired: part 1 alone")
    args = ap.parse_args()
    log = OUT / f"{args.name}.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            done[job_key({k: v for k, v in row.items() if k not in ("val_bpd", "test_bpd", "train_seconds",
                                                                     "eval_test_bpd")})] = row
    todo = [j for j in jobs(args.seeds, args.steps, args.test_n_t)
            if job_key(j) not in done and (args.only == "all" or j["part"] == "paired")]
    print(f"{len(done)} runs done, {len(todo)} to go", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool, log.open("a") as f:
        for row in pool.map(run_job, todo):
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[job_key({k: v for k, v in row.items() if k not in ("val_bpd", "test_bpd", "train_seconds",
                                                                     "eval_test_bpd")})] = row
            print(json.dumps({k: row[k] for k in ("config", "streams", "seed", "part", "test_bpd",
                                                  "train_seconds")}), flush=True)
    report(list(done.values()), args)


if __name__ == "__main__":
    main()
