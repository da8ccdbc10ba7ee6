"""A run's state, as a checkpoint holds it: :func:`run_state` of a trainer and
:func:`restore_run` onto one (weights, optimizer, scheduler, loss scaler, EMA, generators, the
time sampler, the history, and the parameterization with its data statistics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:  # (the trainer imports this module)
    from .trainer import Trainer


def run_state(tr: "Trainer") -> dict:
    """Everything a resumed run needs to continue exactly: weights, optimizer, RNG states."""
    return {
        "config": tr.config.model_dump(mode="json"),
        "step": tr.step,
        "train_seconds": tr.train_seconds,
        "history": tr.history,
        "best_val": tr.best_val,
        "running_loss": tr.running_loss,
        "net": tr.net.state_dict(),
        "parameterization": tr.parameterization,
        "residual_stats": tr.residual.state_dict() if tr.residual is not None else None,
        "process": tr.process.state_dict(),
        "ema": tr.ema.state_dict(),
        "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(),
        "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "data": tr.data_gen.get_state(),
                "noise": tr.noise_gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "time_sampler": tr.time_sampler.state_dict() or None,
    }


def _check_parameterization(tr: "Trainer", state: dict) -> None:
    saved = state.get("parameterization", "eps")  # checkpoints before the residual were eps
    if saved != tr.parameterization:
        raise ConfigError(f"checkpoint was written with model.parameterization={saved!r}, but this run uses "
                          f"{tr.parameterization!r}; the network outputs mean different things")


def restore_run(tr: "Trainer", state: dict) -> None:
    """Restore a :func:`run_state` (of a run with the same parameterization)."""
    _check_parameterization(tr, state)
    if tr.residual is not None:
        tr.residual.load_state_dict(state["residual_stats"])  # the statistics trained with, not recomputed
    tr.step = state["step"]
    tr.train_seconds = state["train_seconds"]
    tr.history = state["history"]
    tr.best_val = state["best_val"]
    tr.running_loss = state.get("running_loss")
    tr.net.load_state_dict(state["net"])
    tr.process.load_state_dict(state["process"])
    tr.ema.load_state_dict(state["ema"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if tr.scaler is not None and state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    tr.data_gen.set_state(state["rng"]["data"])
    tr.noise_gen.set_state(state["rng"]["noise"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if state.get("time_sampler") and tr.time_sampler.state_dict():  # (a sampler without state keeps none)
        tr.time_sampler.load_state_dict(state["time_sampler"], device=tr.device)
