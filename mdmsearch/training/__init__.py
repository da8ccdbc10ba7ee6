"""Training one diffusion: building its pieces, the inner loop, evaluation, checkpoints, artifacts.

    build        config -> Parts (data, process, network, optimizer, EMA, generators)
    trainer      Trainer: the loop, evaluation during training, checkpoints and resume
    inference    evaluation, PF-ODE likelihood and sampling with the reported (EMA) weights
    artifacts    the files a run writes (history.csv, per_example.parquet, metrics.json, ...)
    precision    the network under autocast (model.precision bf16, fp16) and fp16's loss scaler
    distributed  the processes of one data-parallel run, as a trainer sees them
    launch       the entry point: a run in this process, or in train.devices processes

Atomic file writes are :mod:`mdmsearch.io`'s.
"""

from .build import Parts, build_parts, make_optimizer, resolve_device
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .evaluate import evaluate_bpd, prepare_batch
from .inference import draw_samples, evaluate_model, ode_evaluate, reported_weights
from .trainer import CHECKPOINT, RunProgress, RunResult, StopTraining, Trainer
from .launch import Launch  # noqa: E402  (after the trainer it starts)

__all__ = ["Trainer", "Launch", "RunResult", "RunProgress", "StopTraining", "EMA", "evaluate_bpd", "prepare_batch",
           "save_checkpoint", "load_checkpoint", "resolve_device", "CHECKPOINT", "Parts", "build_parts",
           "make_optimizer", "reported_weights", "evaluate_model", "ode_evaluate", "draw_samples"]
