"""What a run leaves in its directory, each file written atomically:

    config.yaml           the run configuration (written first)
    residual_stats.json   mu, s2 of the Gaussian part (mixed parameterization)
    history.csv           one row per evaluation (rewritten at every checkpoint)
    per_example.parquet   per-example val/test BPD of the final evaluation (paired comparisons)
    process.json, qd.png  the reported (EMA) Q and D, their eigenvalues and structure
    samples.png           samples of the reported model (images or 2-D points)
    metrics.json          the final metrics (written last: a finished run has it)

The checkpoint itself is :mod:`mdmsearch.training.checkpoint`'s.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..compare import PER_EXAMPLE_FILE  # per-example val/test BPD for paired comparisons
from ..config import RunConfig
from ..data import DataBundle
from ..diffusion.process import LinearMDM
from ..io import atomic_write_json, atomic_write_text, write_parquet_atomic
from ..objectives.residual import GaussianStats
from ..sampling import save_sample_figure
from ..viz import plot_qd
from .ema import EMA
from .inference import RunModel, draw_samples

__all__ = ["CONFIG_FILE", "RESIDUAL_STATS_FILE", "HISTORY_FILE", "HISTORY_FIELDS", "PER_EXAMPLE_FILE", "PROCESS_FILE",
           "QD_FILE", "SAMPLES_FILE", "METRICS_FILE", "write_config", "write_residual_stats", "write_history",
           "write_per_example", "process_summary", "write_process", "write_samples", "write_metrics"]

CONFIG_FILE = "config.yaml"
RESIDUAL_STATS_FILE = "residual_stats.json"  # mu, s2 of the Gaussian part (mixed parameterization)
HISTORY_FILE = "history.csv"
# kid, kid_se: the sample quality, on the final evaluation's row only (train.quality; docs/quality.md)
HISTORY_FIELDS = ("step", "train_loss", "val_bpd", "val_bpd_se", "train_seconds", "kid", "kid_se")
PROCESS_FILE = "process.json"
QD_FILE = "qd.png"
SAMPLES_FILE = "samples.png"
METRICS_FILE = "metrics.json"


def write_config(out_dir: Path, config: RunConfig) -> None:
    """config.yaml: the configuration as JSON-compatible YAML, in declaration order."""
    atomic_write_text(out_dir / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def write_residual_stats(out_dir: Path, stats: GaussianStats) -> None:
    """residual_stats.json: the statistics of the Gaussian part the run trains with."""
    atomic_write_json(out_dir / RESIDUAL_STATS_FILE, stats.to_dict())


def write_history(out_dir: Path, history: list[dict]) -> None:
    """history.csv: one row per evaluation so far (:data:`HISTORY_FIELDS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / HISTORY_FILE, buf.getvalue())


def write_per_example(out_dir: Path, val: dict, test: dict, n_t: int) -> None:
    """Per-example BPD of the final evaluations (same examples and evaluation seed in every
    run on this data: paired comparisons between runs come from these files)."""
    import pandas as pd  # (pandas only for the one file a finished run writes)

    frames = [pd.DataFrame({"split": split, "index": range(len(res["per_example"])),
                            "bpd": res["per_example"].numpy(), "n_t": n_t})
              for split, res in (("val", val), ("test", test))]
    write_parquet_atomic(pd.concat(frames, ignore_index=True), out_dir / PER_EXAMPLE_FILE)


def process_summary(process: LinearMDM, ema: EMA) -> dict:
    """The reported (EMA) process: name, K, Q, D, eigenvalues of A, structure and its hash."""
    with ema.applied():
        q = process.Q.detach().cpu()  # [n, n]
        d = process.D.detach().cpu()
        a = process.A.detach().cpu()
    eig = torch.linalg.eigvals(a)
    return {"name": process.name, "n_aux": process.n_aux, "Q": q.tolist(), "D": d.tolist(),
            "eig_A_real": eig.real.tolist(), "eig_A_imag": eig.imag.tolist(),
            "structure": process.structure(), "structure_hash": process.structure_hash()}


def write_process(out_dir: Path, summary: dict, step: int) -> None:
    """process.json (the summary) and qd.png (heatmaps of Q and D)."""
    atomic_write_json(out_dir / PROCESS_FILE, summary)
    plot_qd(summary["Q"], summary["D"], out_dir / QD_FILE,
            title=f"{summary['name']} (K={summary['n_aux']}) after {step} steps")


def write_samples(out_dir: Path, run: RunModel, data: DataBundle, n: int, *, steps: int, t_min: float,
                  seed: int) -> str:
    """samples.png: ``n`` Euler-Maruyama samples of the reported model; its file name, or ""
    for data that has no picture (vectors of other than two dimensions)."""
    x = draw_samples(run, n, tuple(data.shape), sampler="em", steps=steps, t_min=t_min, seed=seed)
    path: Optional[Path] = save_sample_figure(x, data.levels, out_dir / SAMPLES_FILE)
    return path.name if path is not None else ""


def write_metrics(out_dir: Path, metrics: dict) -> None:
    """metrics.json: the final metrics, the last file a finished run writes."""
    atomic_write_json(out_dir / METRICS_FILE, metrics)
