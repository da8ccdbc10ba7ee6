"""What a run leaves in its directory, each file written atomically:

    config.yaml           the run configuration (written first)
    residual_stats.json   mu, s2 of the Gaussian part (mixed parameterization)
    history.csv           one row per evaluation (rewritten at every checkpoint)
    per_example.parquet   per-example val/test BPD of the final evaluation (paired comparisons)
    process.json, qd.png  the reported (EMA) Q and D, their eigenvalues and structure
    coupling.json         what the auxiliaries do for the data (effective K and structure, docs/math.md
                          section 9): at the start, at every evaluation (EMA) and at the end
    samples.png           samples of the reported model (images or 2-D points)
    metrics.json          the final metrics (written last: a finished run has it)

The checkpoint itself is :mod:`mdmsearch.training.checkpoint`'s.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..compare import PER_EXAMPLE_FILE  # per-example val/test BPD for paired comparisons
from ..config import RunConfig
from ..data import DataBundle
from ..diffusion.coupling import process_coupling
from ..diffusion.process import LinearMDM
from ..io import atomic_write_json, atomic_write_text, write_parquet_atomic
from ..objectives.residual import GaussianStats
from ..sampling import save_sample_figure
from ..viz import plot_qd
from .ema import EMA
from .inference import RunModel, draw_samples

__all__ = ["CONFIG_FILE", "RESIDUAL_STATS_FILE", "HISTORY_FILE", "HISTORY_FIELDS", "PER_EXAMPLE_FILE", "PROCESS_FILE",
           "QD_FILE", "SAMPLES_FILE", "METRICS_FILE", "COUPLING_FILE", "write_config", "write_residual_stats",
           "write_history", "write_per_example", "process_summary", "write_process", "write_samples", "write_metrics",
           "start_coupling", "record_coupling", "read_coupling"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RESIDUAL_STATS_FILE = "residual_stats.json"  # mu, s2 of the Gaussian part (mixed parameterization)
HISTORY_FILE = "history.csv"
# kid, kid_se: the sample quality, on the final evaluation's row only (train.quality; docs/quality.md)
HISTORY_FIELDS = ("step", "train_loss", "val_bpd", "val_bpd_se", "train_seconds", "kid", "kid_se")
PROCESS_FILE = "process.json"
QD_FILE = "qd.png"
SAMPLES_FILE = "samples.png"
METRICS_FILE = "metrics.json"
COUPLING_FILE = "coupling.json"


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
            "structure": process.structure(), "structure_hash": process.structure_hash(),
            "coupling": process_coupling(process, q, d).to_dict()}


def write_process(out_dir: Path, summary: dict, step: int) -> None:
    """process.json (the summary) and qd.png (heatmaps of Q and D)."""
    atomic_write_json(out_dir / PROCESS_FILE, summary)
    _write_coupling(out_dir, {**read_coupling(out_dir), "end": _entry(step, summary["Q"], summary["D"],
                                                                       summary["coupling"])})
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


# ---------------------------------------------------------------------- coupling.json
def _entry(step: int, q, d, coupling: dict) -> dict:
    """One measurement: the step, Q and D (nested lists) and their coupling (``Coupling.to_dict``)."""
    return {"step": int(step), "Q": q, "D": d, **coupling}


def _measure(step: int, process: LinearMDM, ema: Optional[EMA]) -> dict:
    """The entry of ``process`` now: its EMA Q and D when ``ema`` is given (the reported process;
    only the process's parameters are swapped, not the network's), else its current ones."""
    params = list(process.parameters())
    if ema is not None and params:
        with ema.applied(only=params):
            q, d = process.Q.detach().cpu(), process.D.detach().cpu()  # [n, n] float64
    else:
        q, d = process.Q.detach().cpu(), process.D.detach().cpu()
    return _entry(step, q.tolist(), d.tolist(), process_coupling(process, q, d).to_dict())


def read_coupling(out_dir: Path) -> dict:
    """coupling.json as {"start", "history", "end"}: empty parts where the file is missing, or
    unreadable (set aside in a warning: the next writes start it again)."""
    path = Path(out_dir) / COUPLING_FILE
    empty = {"start": None, "history": [], "end": None}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s); the coupling history starts again", path, exc)
        return empty
    return {**empty, **data} if isinstance(data, dict) else empty


def _write_coupling(out_dir: Path, data: dict) -> None:
    atomic_write_json(Path(out_dir) / COUPLING_FILE, data)


def start_coupling(out_dir: Path, process: LinearMDM) -> None:
    """coupling.json of a run at step 0: the initial process's coupling, no history yet."""
    _write_coupling(out_dir, {"start": _measure(0, process, None), "history": [], "end": None})


def record_coupling(out_dir: Path, step: int, process: LinearMDM, ema: EMA) -> None:
    """Adds the reported (EMA) process's coupling at an evaluation to coupling.json's history
    (entries at this step or later, left by a run resumed from an earlier checkpoint, go)."""
    data = read_coupling(out_dir)
    history = [h for h in data["history"] if int(h.get("step", -1)) < step]
    _write_coupling(out_dir, {**data, "history": [*history, _measure(step, process, ema)]})
