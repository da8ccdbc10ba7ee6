"""Training one diffusion: the inner loop, evaluation, checkpoints."""

from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .ema import EMA
from .evaluate import evaluate_bpd, prepare_batch
from .trainer import CHECKPOINT, RunProgress, RunResult, StopTraining, Trainer, resolve_device

__all__ = ["Trainer", "RunResult", "RunProgress", "StopTraining", "EMA", "evaluate_bpd", "prepare_batch", "save_checkpoint", "load_checkpoint",
           "atomic_write_json", "atomic_write_text", "resolve_device", "CHECKPOINT"]
