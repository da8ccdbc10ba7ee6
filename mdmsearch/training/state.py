"""A run's state, as a checkpoint holds it: :func:`run_state` of a trainer and
:func:`restore_run` onto one (weights, optimizer, scheduler, loss scaler, EMA, generators, the
time sampler, the history, and the parameterization with its data statistics)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from ..errors import ConfigError
from .streams import DEVICE_GENERATORS, generator_seed

if TYPE_CHECKING:  # (the trainer imports this module)
    from .trainer import Trainer

log = logging.getLogger(__name__)


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
                **{name: gen.get_state() for name, gen in _device_generators(tr)},  # noise (+ deq, time, aux)
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "time_sampler": tr.time_sampler.state_dict() or None,
    }


def _check_parameterization(tr: "Trainer", state: dict) -> None:
    saved = state.get("parameterization", "eps")  # checkpoints before the residual were eps
    if saved != tr.parameterization:
        raise ConfigError(f"checkpoint was written with model.parameterization={saved!r}, but this run uses "
                          f"{tr.parameterization!r}; the network outputs mean different things")


def restore_run(tr: "Trainer", state: dict, *, training: bool = True) -> None:
    """Restore a :func:`run_state` (of a run with the same parameterization).  ``training=False``
    (evaluation, sampling): the model and its record only; the optimizer, scaler, generators
    and time sampler of training are left as built (none of them is used)."""
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
    if training:
        _restore_training(tr, state)


def _restore_training(tr: "Trainer", state: dict) -> None:
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if tr.scaler is not None and state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(_host_bytes(rng["torch"]))
    tr.data_gen.set_state(_host_bytes(rng["data"]))
    for name, gen in _device_generators(tr):
        seed = generator_seed(tr.config.train, name)
        if name in rng:
            _restore_generator(gen, rng[name], reseed=seed, step=tr.step)
        else:  # a checkpoint of an earlier version (one noise stream): these streams start at this step
            gen.manual_seed(hash((int(seed), int(tr.step))) & 0x7FFF_FFFF_FFFF)
            log.warning("the checkpoint has no %r generator (written before the streams were set apart): "
                        "resumed with it seeded from (its seed, step %d)", name, tr.step)
    restore_cuda_rng(rng.get("cuda"))
    if state.get("time_sampler") and tr.time_sampler.state_dict():  # (a sampler without state keeps none)
        tr.time_sampler.load_state_dict(state["time_sampler"], device=tr.device)


def _device_generators(tr: "Trainer") -> list[tuple[str, torch.Generator]]:
    """(name, generator) of the run's device generators (:data:`.streams.DEVICE_GENERATORS`; the
    ``deq``, ``time`` and ``aux`` generators exist with streams crn only)."""
    return [(name, gen) for name in DEVICE_GENERATORS if (gen := getattr(tr, f"{name}_gen")) is not None]


def _host_bytes(rng_state: torch.Tensor) -> torch.Tensor:
    """A generator state as ``set_state`` takes it: a CPU uint8 tensor (a checkpoint loaded with
    ``map_location="cuda"`` holds CUDA tensors, which torch refuses as RNG states)."""
    return rng_state.to(device="cpu", dtype=torch.uint8)


def _restore_generator(gen: torch.Generator, saved: torch.Tensor, *, reseed: int, step: int) -> None:
    """``gen``'s saved state, or, when the checkpoint was written on another kind of device (a
    ``train.device: auto`` run moved between a GPU and a CPU machine: CUDA's Philox state is 16
    bytes, the CPU's Mersenne twister 5056), a fresh stream seeded from (seed, step): the run
    continues, no longer draw for draw the run that never moved (its arithmetic differs anyway)."""
    saved = _host_bytes(saved)
    if saved.numel() == gen.get_state().numel():
        gen.set_state(saved)
        return
    gen.manual_seed(hash((int(reseed), int(step))) & 0x7FFF_FFFF_FFFF)
    log.warning("the checkpoint's noise generator is of another device type (%d-byte state; this run's %s "
                "generator has %d): resumed with a fresh noise stream seeded from (seed, step %d)",
                saved.numel(), gen.device.type, gen.get_state().numel(), step)


def restore_cuda_rng(states: Optional[list]) -> None:
    """The saved per-GPU states on the GPUs this process sees: a checkpoint written where more
    GPUs were visible restores the first ones (``set_rng_state_all`` would raise IndexError for
    the rest), one written with fewer leaves the others as they are; none without CUDA."""
    if not states or not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    for index, saved in enumerate(states[:visible]):
        torch.cuda.set_rng_state(_host_bytes(saved), index)
    if len(states) != visible:
        log.info("restored the CUDA generator states of %d GPU(s); the checkpoint has %d, this process sees %d",
                 min(len(states), visible), len(states), visible)
