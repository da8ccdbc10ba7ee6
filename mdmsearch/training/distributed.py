"""The processes that train one run together (data parallel), as the trainer sees them.

A :class:`~.trainer.Trainer` talks to its group through one small interface, so that the
loop reads the same for one process and for N:

    rows(total)            this process's rows of a batch of ``total`` examples
    shard(gen, total)      the generator for those rows (draws for the whole batch, keeps them)
    reduce_gradients(...)  the gradients of all parameters averaged over the processes, and the
                           batch's mean loss (a float64 scalar on the device: nothing is read)
    gather_rows(local, n)  per-example values of the whole batch, in order, on every process
    share(code)            rank 0's integer on every process (its callback's decision)
    check_replicas(...)    every process holds the same weights, bit for bit

:data:`SOLO` is one process: every method is the identity and torch.distributed is never
touched, so a one-process run is exactly what it was before groups existed.  :class:`Ranks` is
rank r of N in an initialized torch.distributed group (gloo on CPU, NCCL on CUDA), which
:func:`init_group` joins; :mod:`.launch` starts the processes.
"""

from __future__ import annotations

import hashlib
import math
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..diffusion.draws import Generator, shard_rows, sharded
from ..errors import ConfigError, ProcessGroupError

__all__ = ["Solo", "SOLO", "Ranks", "Group", "PeerLost", "BACKENDS", "TIMEOUT_ENV", "rank_timeout", "rank_device",
           "init_group", "leave_group"]

# device type -> the torch.distributed backend of its processes
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
TIMEOUT_ENV = "MDMSEARCH_RANK_TIMEOUT"  # seconds a process waits for the others in one collective
DEFAULT_TIMEOUT_S = 600.0  # longer than any evaluation + checkpoint between two collectives


def rank_timeout() -> timedelta:
    """How long a collective waits for a silent peer before it fails (``$MDMSEARCH_RANK_TIMEOUT`` s)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    return timedelta(seconds=seconds)


class PeerLost(ProcessGroupError):
    """A collective failed: another process of the group died, failed or fell silent."""


def _collective(what: str, op, *args, **kwargs):
    """``op(*args, **kwargs)``, a torch.distributed collective; its failure (gloo: a peer's
    connection closed, at once; NCCL: the timeout) is a :class:`PeerLost`."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as exc:  # (DistBackendError and gloo's plain RuntimeError)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PeerLost(f"lost the other processes in {what}: {first}") from exc


class Solo:
    """One process: the whole batch, its own gradients, its own decisions."""

    rank, world, is_main, device = 0, 1, True, None

    def rows(self, total: int) -> slice:
        return slice(0, total)

    def shard(self, generator: Optional[torch.Generator], total: int) -> Generator:
        return generator

    def reduce_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        return loss.detach().to(torch.float64)

    def gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        return local

    def share(self, code: int) -> int:
        return code

    def check_replicas(self, params: list[torch.Tensor], step: int) -> None:
        pass

    def separate_global_rng(self, seed: int, step: int) -> None:
        pass


SOLO = Solo()


class Ranks:
    """Rank ``rank`` of ``world`` processes in the default torch.distributed group; collectives
    run on ``device`` (its GPU for NCCL, the CPU for gloo)."""

    is_main: bool

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.is_main = rank == 0

    def rows(self, total: int) -> slice:
        return shard_rows(total, self.rank, self.world)

    def shard(self, generator: Optional[torch.Generator], total: int) -> Generator:
        return sharded(generator, self.rows(total), total)

    @torch.no_grad()
    def reduce_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` (network float32, process float64) over the
        processes, one flat all_reduce per dtype; the loss rides in the float64 one (returned as
        a float64 scalar on the device).  The sum is the same bits on every process, so the
        averaged gradients are too."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {torch.float64: []}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        mean_loss = torch.tensor(math.nan, dtype=torch.float64)
        for dtype, grads in by_dtype.items():
            parts = [g.reshape(-1) for g in grads]
            if dtype == torch.float64:
                parts.append(loss.detach().reshape(1).to(device=self.device, dtype=dtype))
            flat = torch.cat(parts)  # [sum of numels (+ 1)]
            _collective("the gradient all_reduce", dist.all_reduce, flat)
            flat.div_(self.world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if dtype == torch.float64:
                mean_loss = flat[-1].clone()
        return mean_loss

    def gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The rows of every process, [total, *rest] in batch order, from this process's [rows, *rest]."""
        most = shard_rows(total, 0, self.world).stop  # rank 0 has the most rows
        padded = local.new_zeros((most, *local.shape[1:]), device=self.device)
        padded[: local.shape[0]] = local.to(self.device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        _collective("gathering the evaluation", dist.all_gather, out, padded)
        sizes = [shard_rows(total, r, self.world) for r in range(self.world)]
        return torch.cat([o[: s.stop - s.start] for o, s in zip(out, sizes)]).to(local.device)

    def share(self, code: int) -> int:
        t = torch.tensor([int(code)], dtype=torch.int64, device=self.device)
        _collective("rank 0's decision", dist.broadcast, t, src=0)
        return int(t)

    def check_replicas(self, params: list[torch.Tensor], step: int) -> None:
        """Raise on every process if any holds other weights than rank 0 (a digest of the bytes)."""
        mine = torch.tensor([_digest(params)], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        _collective("the replica check", dist.all_gather, every, mine)
        differ = [r for r, d in enumerate(every) if int(d) != int(every[0])]
        if differ:
            raise ProcessGroupError(f"at step {step} the weights of process(es) {differ} differ from rank 0's: "
                                    "the gradients were not averaged identically")

    def separate_global_rng(self, seed: int, step: int) -> None:
        """Give ranks 1.. their own torch global stream (dropout masks); rank 0 keeps the
        stream a one-process run has (the one its checkpoints record)."""
        if self.rank > 0:
            torch.manual_seed(hash((int(seed), self.rank, int(step))) & 0x7FFF_FFFF_FFFF)


Group = Solo | Ranks


def _digest(params: list[torch.Tensor]) -> int:
    """A 63-bit digest of the bytes of ``params`` (host copies)."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        h.update(p.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def rank_device(name: str, local_rank: int, world: int, local_world: Optional[int] = None) -> torch.device:
    """The device of process ``local_rank`` of the ``local_world`` processes on this machine (of
    ``world`` in all; default: all on this machine): the CPU, or GPU cuda:local_rank for
    ``train.device`` auto (with CUDA) or cuda; a one-GPU name (cuda:1) cannot be shared.  Each
    machine needs a GPU per process it runs, not per process of the whole group (a 2-node
    torchrun with one GPU per node is 2 processes with one GPU each)."""
    from .build import resolve_device

    local_world = world if local_world is None else local_world
    base = resolve_device(name)
    if base.type not in BACKENDS:
        raise ConfigError(f"train.device {name!r}: data-parallel training runs on {' or '.join(BACKENDS)}, "
                          f"not {base.type}")
    if base.type == "cpu":
        return base
    if base.index is not None:
        raise ConfigError(f"train.device {name!r} names one GPU, but {world} processes train: use cuda "
                          f"(process r uses cuda:r)")
    visible = torch.cuda.device_count()
    if visible < local_world or local_rank >= visible:
        raise ConfigError(f"{local_world} processes on this machine need {local_world} GPUs, it has {visible}")
    return torch.device("cuda", local_rank)


def init_group(rank: int, world: int, device: torch.device, store: Optional[dist.Store] = None) -> Ranks:
    """Join the default process group as ``rank`` of ``world`` (over ``store``, else the
    environment of torchrun) with the backend of ``device``'s type."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # NCCL collectives are asynchronous: without a blocking wait, a dead peer makes the
        # watchdog abort this process at the timeout instead of raising where _collective catches it
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    dist.init_process_group(BACKENDS[device.type], store=store, rank=rank, world_size=world,
                            timeout=rank_timeout(), **({} if store is not None else {"init_method": "env://"}))
    return Ranks(rank, world, device)


def leave_group() -> None:
    """Destroy the default process group if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
