"""The GPU checks of benchmarks/gpu_check.sh that run inside Python (one part per call).

    python benchmarks/gpu_check.py syncs   WORK   # sync warnings in 20 deferred steps (and the host steps)
    python benchmarks/gpu_check.py steps   WORK   # step time: fp32/bf16/fp16 x batch 64/1024, VPSDE / learned K=3
    python benchmarks/gpu_check.py compose WORK   # reports/benchmarks/gpu.{md,json} from WORK/*.json

Each part writes WORK/<part>.json; ``compose`` also reads WORK/cli.tsv (the shell's command checks).
Data are random pixels of the digits (1x8x8, 17 levels) and MNIST (1x28x28, 256 levels) shapes:
step time depends on the shapes, not on the images.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from _common import OUT, machine, md_table

from mdmsearch.config import parse_run_config
from mdmsearch.data import DataBundle
from mdmsearch.training import Trainer

SHAPES = {"digits": ((1, 8, 8), 17, "tiny"), "mnist": ((1, 28, 28), 256, "small")}
PROCESSES = {"vpsde": {"name": "vpsde"}, "learned K=3": {"name": "learned", "n_aux": 3}}
WARMUP, TIMED = 5, 30


def bundle(shape, levels, n=2048) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    pix = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.int64).to(torch.uint8)
    return DataBundle(name="gpu-check", shape=tuple(shape), levels=levels, train=pix, val=pix[:256], test=pix[:256])


def trainer(size: str, process: str, precision: str, batch: int, out: Path) -> Trainer:
    shape, levels, net = SHAPES[size]
    cfg = parse_run_config({"process": PROCESSES[process], "model": {"size": net, "precision": precision},
                            "optim": {"batch_size": batch},
                            "train": {"steps": 10**6, "eval_every": 10**6, "n_samples": 0, "progress": False,
                                      "device": "cuda"}})
    return Trainer(cfg, out, data=bundle(shape, levels))


def sync_warnings(tr: Trainer, steps: int = 20) -> list[str]:
    """The synchronizing operations torch reports in ``steps`` training steps (a message each)."""
    for _ in range(3):
        tr._step()
    torch.cuda.synchronize()
    tr._settle()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                tr._step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
            if "synchroniz" in str(w.message)]


def part_syncs(work: Path) -> dict:
    rows = []
    for process in PROCESSES:
        for precision in ("fp32", "fp16"):
            for deferred in (True, False):
                tr = trainer("digits", process, precision, 64, work / "syncs")
                tr.deferred = deferred
                found = sync_warnings(tr)
                rows.append({"process": process, "precision": precision, "step": "deferred" if deferred else "host",
                             "sync warnings in 20 steps": len(found), "where (first 3)": sorted(set(found))[:3]})
    return {"rows": rows}


def step_ms(tr: Trainer) -> float:
    for _ in range(WARMUP):
        tr._step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        tr._step()
    tr._settle()  # (one read, as a logging step does)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / TIMED


def part_steps(work: Path) -> dict:
    rows = []
    for size in SHAPES:
        for process in PROCESSES:
            for batch in (64, 1024):
                for precision in ("fp32", "bf16", "fp16"):
                    ms = step_ms(trainer(size, process, precision, batch, work / "steps"))
                    rows.append({"data": size, "process": process, "batch": batch, "precision": precision,
                                 "ms/step": ms})
            host = trainer(size, process, "fp32", 64, work / "steps")
            host.deferred = False
            rows.append({"data": size, "process": process, "batch": 64, "precision": "fp32 (host reads)",
                         "ms/step": step_ms(host)})
    return {"rows": rows, "warmup": WARMUP, "timed": TIMED}


def compose(work: Path) -> Path:
    parts = {p: json.loads((work / f"{p}.json").read_text()) for p in ("syncs", "steps") if (work / f"{p}.json").exists()}
    cli = [dict(zip(("check", "status", "detail"), line.split("\t", 2)))
           for line in (work / "cli.tsv").read_text().splitlines()] if (work / "cli.tsv").exists() else []
    md = ["# gpu check (benchmarks/gpu_check.sh)", "", f"Machine: `{json.dumps(machine())}`", "",
          "## Commands on CUDA (train, evaluate, sample, resume; a GPU checkpoint on the CPU and back; Ray)", "",
          md_table(cli, ["check", "status", "detail"]) if cli else "(not run)", ""]
    if "syncs" in parts:
        md += ["## Host syncs in 20 training steps (`torch.cuda.set_sync_debug_mode('warn')`, digits, batch 64)",
               "", "The deferred step is what a run on CUDA takes; the host step is the CPU's, for contrast.", "",
               md_table(parts["syncs"]["rows"], ["process", "precision", "step", "sync warnings in 20 steps",
                                                  "where (first 3)"]), ""]
    if "steps" in parts:
        md += [f"## Step time (ms, mean of {parts['steps']['timed']} steps after {parts['steps']['warmup']})", "",
               md_table(parts["steps"]["rows"], ["data", "process", "batch", "precision", "ms/step"],
                        {"ms/step": "{:.2f}"}), ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps({"machine": machine(), "cli": cli, **parts}, indent=2, default=str) + "\n")
    (OUT / "gpu.md").write_text("\n".join(md))
    return OUT / "gpu.md"


PARTS = {"syncs": part_syncs, "steps": part_steps}

if __name__ == "__main__":
    part, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA GPU visible")
    if part == "compose":
        print(compose(work))
    else:
        (work / f"{part}.json").write_text(json.dumps(PARTS[part](work), indent=2, default=str) + "\n")
