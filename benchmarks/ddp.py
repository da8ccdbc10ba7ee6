"""Data-parallel training on this machine: the step time of 1 process against 2 processes.

Trains the same run (digits, tiny U-Net, learned K = 2 with the mixed predictor, one seed)
through the entry point every caller uses (``mdmsearch.training.launch.run``) as
  * 1 process with 1 torch thread,
  * 1 process with 2 threads,
  * 2 processes with 1 thread each (gloo on the loopback; each takes half the batch),
for global batches 64 and 256, in rounds (one run of each setting per round, so that a
machine whose speed drifts affects all alike), and reports the median seconds per training
step (rank 0's ``train_seconds`` / steps: forward, backward, the all_reduce of the gradients
and the optimizer) and the ratios, plus the final validation BPD (the same run: equal to float
noise).  Start-up (spawning, importing torch: ~2 s) and evaluation are not in the step time.

    python benchmarks/ddp.py --quick   # batch 64, 100 steps, 1 round
    python benchmarks/ddp.py           # batches 64 and 256, 300 steps, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from _common import md_table, write

from mdmsearch.config import parse_run_config
from mdmsearch.training import launch

# label -> (processes, torch threads per process)
SETTINGS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def config(batch: int, steps: int, devices: int):
    return parse_run_config({
        "process": {"name": "learned", "n_aux": 2}, "data": {"name": "digits"},
        "model": {"name": "unet", "size": "tiny"}, "optim": {"batch_size": batch},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 270, "test_n_t": 4, "n_samples": 0,
                  "progress": False, "devices": devices, "device": "cpu"}})


def one_run(batch: int, steps: int, devices: int, threads: int) -> tuple[float, float]:
    """(seconds per step, final val_bpd) of one run; rank 0 gets threads x devices threads, which
    the entry point divides between the processes."""
    torch.set_num_threads(threads * devices)
    with tempfile.TemporaryDirectory() as out:
        res = launch.run(config(batch, steps, devices), out, resume=False)
    return res.metrics["train_seconds"] / steps, res.metrics["val_bpd"]


def measure(batch: int, steps: int, rounds: int) -> list[dict]:
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    bpd: dict[str, float] = {}
    for _ in range(rounds):
        for label, (devices, threads) in SETTINGS.items():
            step_s, bpd[label] = one_run(batch, steps, devices, threads)
            times[label].append(step_s)
    base = statistics.median(times["1 process x 1 thread"])
    return [{"batch": batch, "setting": label, "processes": SETTINGS[label][0], "threads": SETTINGS[label][1],
             "step_ms": 1e3 * statistics.median(t), "speedup_vs_1x1": base / statistics.median(t),
             "val_bpd": bpd[label], "step_ms_all": [round(1e3 * x, 3) for x in t]} for label, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    batches, steps, rounds = ([64], 100, 1) if args.quick else ([64, 256], 300, 3)
    rows = [row for batch in batches for row in measure(batch, steps, rounds)]
    table = md_table(rows, ["batch", "setting", "step_ms", "speedup_vs_1x1", "val_bpd"],
                     {"step_ms": "{:.2f}", "speedup_vs_1x1": "{:.2f}", "val_bpd": "{:.6f}"})
    note = (f"Digits, tiny U-Net, learned K = 2 (mixed), {steps} steps per run, median of {rounds} round(s); "
            "step_ms = rank 0's training seconds per step (forward, backward, gradient all_reduce, optimizer).")
    path = write("ddp" + ("_quick" if args.quick else ""), {"steps": steps, "rounds": rounds, "rows": rows},
                 table + "\n\n" + note)
    print(table)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
