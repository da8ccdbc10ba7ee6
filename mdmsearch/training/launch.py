"""One entry point for training a run, in one process or several (data parallel).

    run(config, out_dir, callback=None, data=None, resume=True, replay=False) -> RunResult
    Launch(config, out_dir, callback, data).run(resume=..., replay=...)    (and .progress())

``train.devices == 1`` (the default): a :class:`~.trainer.Trainer` in this process, exactly as
before.  ``train.devices == N > 1``: this process is rank 0 and spawns ranks 1..N-1 (spawn
start method; a TCP store on a free loopback port), so that the callback (the search's pruner)
runs here, unchanged; gloo on CPU, NCCL on CUDA (rank r on cuda:r).  Started by ``torchrun``
(RANK, WORLD_SIZE and LOCAL_RANK set), this process joins that group instead.

Every process trains on its rows of the global batch and the gradients are averaged
(:mod:`.distributed`); rank 0 alone writes files.  A rank that dies or fails makes rank 0
fail with a :class:`~mdmsearch.errors.ProcessGroupError` that names it (a dead peer breaks
gloo's next collective at once; NCCL waits for ``$MDMSEARCH_RANK_TIMEOUT``, default 600 s).
A failure of rank 0 ends the other ranks.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data import DataBundle
from ..data.cache import load_from_config
from ..errors import ConfigError, MDMError, ProcessGroupError, one_line
from .distributed import PeerLost, init_group, leave_group, rank_device, rank_timeout
from .trainer import Callback, MainFailed, RunProgress, RunResult, Trainer

__all__ = ["run", "Launch", "torchrun_env", "local_world_size", "is_main_process"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
EXIT_AFTER_MAIN = 3  # a rank's exit code when rank 0 failed first (rank 0 reports its own error)
GRACE_S = 2.0  # how long rank 0, failing, waits for a rank that died first to have its exit code
READY_KEY = "mdmsearch/ready"  # set in the store by each spawned rank once it runs


def torchrun_env() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    if not all(k in os.environ for k in TORCHRUN_KEYS):
        return None
    return tuple(int(os.environ[k]) for k in TORCHRUN_KEYS)  # type: ignore[return-value]


def local_world_size(world: int) -> int:
    """Processes of the group on this machine: torchrun's LOCAL_WORLD_SIZE (else all ``world``)."""
    raw = os.environ.get("LOCAL_WORLD_SIZE")
    return int(raw) if raw and raw.isdigit() else world


def is_main_process() -> bool:
    """False on ranks 1.. of a torchrun group (they print and write nothing)."""
    env = torchrun_env()
    return env is None or env[0] == 0


def run(config: RunConfig, out_dir: str | Path, callback: Optional[Callback] = None,
        data: Optional[DataBundle] = None, resume: bool = True, replay: bool = False) -> RunResult:
    """Train ``config`` into ``out_dir`` with ``train.devices`` processes: see the module."""
    return Launch(config, out_dir, callback=callback, data=data).run(resume=resume, replay=replay)


class Launch:
    """A run about to be trained; :meth:`run` trains it, :meth:`progress` says where rank 0 stands
    (also after an exception: what a search records of a failed run)."""

    def __init__(self, config: RunConfig, out_dir: str | Path, callback: Optional[Callback] = None,
                 data: Optional[DataBundle] = None):
        self.config, self.out_dir, self.callback, self.data = config, Path(out_dir), callback, data
        self.trainer: Optional[Trainer] = None  # rank 0's (this process's), once built

    def progress(self) -> RunProgress:
        if self.trainer is None:
            return RunProgress(step=0, history=[], best_val=math.inf, train_seconds=0.0, n_params=0)
        return self.trainer.progress()

    def run(self, *, resume: bool = True, replay: bool = False) -> RunResult:
        joined = torchrun_env()
        if joined is not None:
            return self._run_joined(*joined, resume=resume, replay=replay)
        if self.config.train.devices == 1:
            self.trainer = Trainer(self.config, self.out_dir, callback=self.callback, data=self.data)
            return self.trainer.run(resume=resume, replay=replay)
        return self._run_spawned(resume=resume, replay=replay)

    def _run_joined(self, rank: int, world: int, local_rank: int, *, resume: bool, replay: bool) -> RunResult:
        """This process as ``rank`` of a torchrun group (``train.devices`` must be 1 or the group's size)."""
        _check_group_size(self.config, world)
        device = rank_device(self.config.train.device, local_rank, world, local_world_size(world))
        group = init_group(rank, world, device)
        try:
            self.trainer = Trainer(self.config, self.out_dir, callback=self.callback if rank == 0 else None,
                                   data=self.data, group=group)
            return self.trainer.run(resume=resume, replay=replay)
        finally:
            leave_group()

    def _run_spawned(self, *, resume: bool, replay: bool) -> RunResult:
        """Rank 0 here, ranks 1..N-1 spawned; their failures become rank 0's one clear error."""
        world = self.config.train.devices
        device = rank_device(self.config.train.device, 0, world)  # (checks the GPUs before spawning)
        data = self.data if self.data is not None else load_from_config(self.config.data)
        store = dist.TCPStore(LOOPBACK, 0, world, is_master=True, timeout=rank_timeout(), wait_for_workers=False)
        threads = max(1, torch.get_num_threads() // world)  # the processes share this process's cores
        job = _Job(self.config, str(self.out_dir), _payload(data), store.port, world, threads, resume, replay)
        ranks = _Ranks.start(job)
        before, done = torch.get_num_threads(), False
        torch.set_num_threads(threads)
        try:
            ranks.wait_ready(store)
            group = init_group(0, world, device, store=store)
            self.trainer = Trainer(self.config, self.out_dir, callback=self.callback, data=data, group=group)
            result = self.trainer.run(resume=resume, replay=replay)
            done = True
        except Exception as exc:
            ranks.fail(exc)  # raises: rank 0's own error, or the error of the rank that failed first
        finally:
            if not done:
                leave_group()  # (first: ranks blocked in a collective then fail at once and end)
            ranks.stop(wait=done)
            leave_group()
            torch.set_num_threads(before)
        ranks.check()
        return result


def _check_group_size(config: RunConfig, world: int) -> None:
    if config.train.devices not in (1, world):
        raise ConfigError(f"train.devices is {config.train.devices} but torchrun started {world} processes")
    if config.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size {config.optim.batch_size} is not divisible by the {world} processes "
                          "torchrun started")
    if config.train.eval_batch_size < world:
        raise ConfigError(f"train.eval_batch_size {config.train.eval_batch_size} is smaller than the {world} "
                          "processes torchrun started")


# ---------------------------------------------------------------------- the spawned ranks
@dataclass(frozen=True)
class _Job:
    """What a spawned rank needs (pickled to it)."""

    config: RunConfig
    out_dir: str
    data: dict[str, Any]  # the dataset, as plain arrays (see _payload)
    port: int  # rank 0's TCP store on the loopback
    world: int
    threads: int  # torch threads of each process
    resume: bool
    replay: bool


def _payload(data: DataBundle) -> dict[str, Any]:
    """The dataset as numpy arrays, pickled through the pipe to each rank (torch would move
    tensors through /dev/shm, which containers often keep small)."""
    arrays = {split: getattr(data, split).numpy() for split in ("train", "val", "test")}
    return {"name": data.name, "shape": data.shape, "levels": data.levels, "meta": dict(data.meta), **arrays}


def _bundle(payload: dict[str, Any]) -> DataBundle:
    tensors = {split: torch.from_numpy(payload[split]) for split in ("train", "val", "test")}
    return DataBundle(name=payload["name"], shape=payload["shape"], levels=payload["levels"], meta=payload["meta"],
                      **tensors)


def _rank_main(job: _Job, rank: int, errors) -> None:
    """A spawned rank: join rank 0's group, train its share, report a failure in one line.
    It ends with :func:`_exit_now` whatever happens (rank 0 tears the group down)."""
    torch.set_num_threads(job.threads)
    code = 0
    try:
        store = dist.TCPStore(LOOPBACK, job.port, job.world, is_master=False, timeout=rank_timeout())
        store.set(f"{READY_KEY}/{rank}", "1")
        group = init_group(rank, job.world, rank_device(job.config.train.device, rank, job.world), store=store)
        Trainer(job.config, job.out_dir, data=_bundle(job.data), group=group).run(resume=job.resume,
                                                                                   replay=job.replay)
    except (MainFailed, PeerLost, KeyboardInterrupt):  # rank 0 failed first and reports it (or the interrupt)
        code = EXIT_AFTER_MAIN
    except MDMError as exc:  # a decided failure (NaN loss, ...): one line, rank 0 has it too
        errors.put((rank, one_line(exc)))
        code = 1
    except Exception as exc:  # anything else: one line for rank 0's error, the traceback on this rank's stderr
        errors.put((rank, one_line(exc)))
        traceback.print_exc()
        code = 1
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End a spawned rank without tearing down its process group or running destructors: when
    a peer closes its end first, gloo's teardown can abort (SIGABRT, "terminate called without
    an active exception") instead of exiting, which read as a crash of a rank that had finished."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class _Ranks:
    """Ranks 1..N-1 as child processes of rank 0, and their one-line error reports."""

    def __init__(self, procs: list, errors):
        self.procs, self.errors = procs, errors

    @classmethod
    def start(cls, job: _Job) -> "_Ranks":
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        procs = [ctx.Process(target=_rank_main, args=(job, rank, errors), name=f"mdmsearch-rank-{rank}", daemon=True)
                 for rank in range(1, job.world)]
        for p in procs:
            p.start()
        return cls(procs, errors)

    def _reports(self) -> dict[int, str]:
        out = {}
        while not self.errors.empty():
            rank, message = self.errors.get()
            out[rank] = message
        return out

    def _failures(self) -> list[str]:
        """'rank r: what it said' (or how it ended) for each rank that ended badly so far."""
        reports = self._reports()
        bad = []
        for rank, p in enumerate(self.procs, start=1):
            if rank in reports:
                bad.append(f"rank {rank}: {reports[rank]}")
            elif p.exitcode not in (None, 0, EXIT_AFTER_MAIN):
                how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                bad.append(f"rank {rank} died ({how})")
        return bad

    def fail(self, exc: Exception) -> None:
        """Rank 0 failed with ``exc``.  Lost in a collective: the ranks that died or failed are
        the error (one ProcessGroupError naming them); its own failure: ``exc`` itself."""
        if not isinstance(exc, PeerLost):
            raise exc
        for p in self.procs:
            p.join(timeout=GRACE_S / len(self.procs))
        failures = self._failures() or [str(exc)]
        raise ProcessGroupError(f"data-parallel training failed: {'; '.join(failures)}") from exc

    def wait_ready(self, store: dist.Store) -> None:
        """Until every rank runs (has imported torch and reached the store): a rank that dies
        before it joins the group would otherwise leave rank 0 waiting for the whole timeout."""
        keys = [f"{READY_KEY}/{rank}" for rank in range(1, len(self.procs) + 1)]
        deadline = time.monotonic() + rank_timeout().total_seconds()
        while not store.check(keys):
            dead = [p for p in self.procs if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                failures = self._failures() or [f"not all ranks started within {rank_timeout().total_seconds():.0f}s"]
                raise ProcessGroupError(f"data-parallel training could not start: {'; '.join(failures)}")
            time.sleep(0.05)

    def stop(self, wait: bool) -> None:
        """Wait for the ranks to end (after a completed run they end with rank 0's last
        collective; after a failure they get a short grace); end any that are left."""
        timeout = rank_timeout().total_seconds() if wait else GRACE_S
        for p in self.procs:
            p.join(timeout=timeout)
            if p.is_alive():
                if wait:
                    log.warning("%s did not end: terminated", p.name)
                p.terminate()
                p.join()

    def check(self) -> None:
        """After rank 0 completed: every rank must have completed too."""
        failures = self._failures()
        if failures:
            raise ProcessGroupError(f"data-parallel training failed: {'; '.join(failures)}")
