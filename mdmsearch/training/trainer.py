"""The inner loop: maximize the ELBO jointly over network weights and the process (Q, D).

    Trainer(config, out_dir, callback).fit(resume=...)  ->  final metrics dict
    Trainer(config, out_dir, callback).run(replay=...)  ->  RunResult (complete or stopped)

Every ``eval_every`` steps: validation BPD with the EMA weights and a fixed evaluation seed,
an atomic checkpoint, then ``callback(step, metrics)``; a callback ends the run early by
raising :class:`StopTraining` (the search's pruner does), which :meth:`Trainer.run` turns into
a stopped :class:`RunResult`.  A resumed run continues exactly as an uninterrupted one (all
randomness comes from generators whose states are checkpointed).

The pieces are built by :mod:`.build`, evaluation and sampling go through :mod:`.inference`
(the reported, EMA weights), and the files a run writes are :mod:`.artifacts`'.

A trainer is one process of its run's group (:mod:`.distributed`; :mod:`.launch` starts them):
alone by default, or one of N data-parallel processes that each take their rows of every
batch, average the gradients, and evaluate their share of the examples.  Rank 0 alone writes
files and calls the callback, and its decisions (resume, stop) reach every process.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import RunConfig, upgrade_saved_config
from ..data import DataBundle
from ..diffusion.process import LinearMDM
from ..diffusion.ops import HostPlan, planned, van_loan_norm
from ..errors import CholeskyError, ConfigError, NonFiniteLossError
from ..io import set_aside
from ..objectives import elbo
from ..objectives.residual import GaussianStats, ResidualEps
from ..objectives.time_sampling import AdaptiveTime, TimeSampler
from . import artifacts
from .artifacts import PER_EXAMPLE_FILE, RESIDUAL_STATS_FILE  # noqa: F401  (names callers import from here)
from .build import Parts, build_parts, make_optimizer, resolve_device  # noqa: F401  (re-exported: benchmarks)
from .state import restore_run, run_state
from .checkpoint import UNREADABLE, config_mismatch, load_checkpoint, save_checkpoint
from .distributed import SOLO, Group
from .ema import EMA
from .evaluate import prepare_batch
from .ledger import OVERFLOW_LIMIT, READ_EVERY, StepLedger
from .inference import evaluate_model, sample_quality
from .progress import StepProgress

log = logging.getLogger(__name__)

Callback = Callable[[int, dict], None]
CHECKPOINT = "checkpoint.pt"
# what rank 0 shares when its side of a decision raised (any other shared value is its result, >= 0)
_STOPPED, _FAILED = -1, -2
# a deferred step's bound on the norm of a learned process's Van Loan block: twice the norm last read
# (one squaring more than needed; the check in HostPlan allows a further 2x before it fails)
PLAN_HEADROOM = 2.0


class StopTraining(Exception):
    """Raised by a callback to end a run early (e.g. a pruner); the message says why."""


class MainFailed(Exception):
    """Raised on ranks 1.. when rank 0 failed at a shared decision (rank 0 raises its own error)."""


@dataclass
class RunProgress:
    """A run's state for callers that stop it early (the search's pruner) or resume it."""

    step: int
    history: list[dict]  # one row per evaluation: step, val_bpd, ...
    best_val: float
    train_seconds: float
    n_params: int

    @property
    def last_val(self) -> Optional[float]:
        return self.history[-1].get("val_bpd") if self.history else None


@dataclass
class RunResult:
    """How :meth:`Trainer.run` ended: ``completed`` with the final ``metrics``, or stopped by
    the callback (``reason``); ``progress`` either way."""

    completed: bool
    progress: RunProgress
    metrics: Optional[dict] = None
    reason: Optional[str] = None


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """2-norm of all gradients together (float64 scalar).

    On GPUs the multi-tensor norm of ``get_total_norm``.  On CPU, where multi-tensor kernels
    loop over the tensors one by one, one norm of each dtype's gradients concatenated is
    3x cheaper for small networks (0.12 vs 0.36 ms for the tiny U-Net's 130 tensors) and costs
    one copy of the gradients for large ones (a few ms against a step of seconds)."""
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads, foreach=True).to(torch.float64)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g.reshape(-1))
    norms = [torch.linalg.vector_norm(torch.cat(flat)).to(torch.float64) for flat in by_dtype.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


class Trainer:
    """One run: its pieces (:class:`~.build.Parts`, as attributes), its step, history and best
    validation BPD; :meth:`fit` trains, evaluates, checkpoints and writes the artifacts.

    Why one class of ~450 lines: it is the loop's state (step, history, best, the pieces, the
    process group) and its methods are the loop's verbs, each under 30 lines; building the
    pieces lives in :mod:`.build`, evaluation and sampling in :mod:`.inference`, artifacts in
    :mod:`.artifacts`, the processes of a data-parallel run in :mod:`.distributed`."""

    # the pieces, from build_parts (callers read and replace them: tr.net, tr.ema, tr.optimizer, ...)
    device: torch.device
    data: DataBundle
    train_x: torch.Tensor
    process: LinearMDM
    net: torch.nn.Module
    parameterization: str
    model: Callable
    time_sampler: TimeSampler
    eval_sampler: TimeSampler
    process_params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA
    data_gen: torch.Generator
    noise_gen: torch.Generator
    deq_gen: Optional[torch.Generator]
    time_gen: Optional[torch.Generator]
    aux_gen: Optional[torch.Generator]
    n_params: int
    scaler: Optional[torch.amp.GradScaler]

    def __init__(self, config: RunConfig, out_dir: str | Path, callback: Optional[Callback] = None,
                 data: Optional[DataBundle] = None, group: Group = SOLO):
        self.config = config
        self.out_dir = Path(out_dir)
        self.callback = callback
        self.group = group  # this process's place in the run (alone: SOLO)
        parts = build_parts(config, data, device=group.device)
        for f in fields(Parts):
            setattr(self, f.name, getattr(parts, f.name))
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.best_val = math.inf
        self._last_eval: Optional[tuple] = None
        self.running_loss: Optional[float] = None
        # read the loss, gradient norm and checks on the host every step (CPU), or keep them on the
        # device and read them once per logging step (a GPU: .ledger); either way the same numbers
        self.deferred = self.device.type != "cpu"
        self._ledger: Optional[StepLedger] = None
        self._overflows = 0  # consecutive fp16 steps with a non-finite loss (host checks)
        self._block_norm: Optional[float] = None  # ||Van Loan block||_1 as last read (deferred steps)
        self._max_b = float(self.process.schedule.integral(torch.tensor(self.process.T, dtype=torch.float64)))

    @property
    def residual(self) -> Optional[GaussianStats]:
        """The statistics of the Gaussian part (mixed parameterization), else None."""
        return self.model.stats if isinstance(self.model, ResidualEps) else None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes files and calls the callback."""
        return self.group.is_main

    # ------------------------------------------------------------------ one step
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Negative ELBO in nats per dimension without the truncation term at t_min: that term
        costs a second network pass, and its value (and so its pull on Q and D) is small, 0.001
        to 0.014 nats/dim for trained digits models; evaluation always includes it.

        ``batch`` [b, *shape]: this process's rows of a batch of b x (processes) examples, whose
        dequantization, times and noise are drawn for the whole batch (the rows of one process's draws).
        Streams ``crn``: each from its own generator (:mod:`.streams`); ``shared``: all three, in
        that order, from ``noise_gen`` (the ``deq``, ``time`` and ``aux`` generators are None)."""
        total = batch.shape[0] * self.group.world
        noise, deq, times, aux = (self.group.shard(g, total) if g is not None else None
                                  for g in (self.noise_gen, self.deq_gen, self.time_gen, self.aux_gen))
        x, _ = prepare_batch(batch, self.data.levels, noise if deq is None else deq)
        nats = elbo(self.process, x, self.model, time_sampler=self.time_sampler, truncation=False, generator=noise,
                    time_generator=times, aux_generator=aux)
        return -nats.mean() / self.data.dim

    def _batch(self) -> torch.Tensor:
        """This process's rows of a random batch of ``optim.batch_size`` examples (every process
        draws the same indices), [batch_size / processes, *shape] on the device.  The indices are
        drawn on the host (the data generator's stream is the same on every device) and reach a
        GPU from pinned memory without a wait (a pageable copy would block until it is done)."""
        size = self.config.optim.batch_size
        idx = torch.randint(0, self.train_x.shape[0], (size,), generator=self.data_gen)[self.group.rows(size)]
        if self.device.type == "cuda":
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        return self.train_x[idx.to(self.device)]

    def train_step(self) -> float:
        """One optimizer step on a random batch; the loss (nats/dim, of the whole batch) before the
        step, read from the device (the loop itself reads it once per logging step: :meth:`_step`)."""
        return float(self._step())

    def _step(self) -> torch.Tensor:
        """One optimizer step; the loss as a float64 scalar on the device.  On CPU (``deferred``
        False) the loss and the gradient norm are checked here; on a GPU they go to the ledger."""
        batch = self._batch()
        if not self.net.training:  # (evaluation switches it off; walking the modules every step costs)
            self.net.train()
        plan = self._plan()
        with planned(plan):
            loss = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        value = self.group.reduce_gradients(self._with_grads(), loss)  # (processes: gradients averaged)
        if plan is None:
            self._check_loss(float(value))
        else:
            if self._ledger is None:  # (fit starts one; a step outside fit, e.g. a test's, gets its own)
                self._ledger = StepLedger(self.device, self.running_loss)
            self._ledger.add_loss(value, self.step + 1, skippable=self.scaler is not None)
            self._ledger.add_flags(plan.flags, self.step + 1)
        self._optimizer_step()
        self.scheduler.step()
        self.ema.update(self.step)
        self.step += 1
        if isinstance(self.time_sampler, AdaptiveTime) and self.step % self.config.train.adaptive_refresh == 0:
            self.time_sampler.refresh(self.process)
        return value

    def _check_loss(self, value: float) -> None:
        """A non-finite loss is an error, except under fp16's loss scaler: there it is an overflow
        whose step the scaler skips (its gradients are not finite either), unless
        :data:`~.ledger.OVERFLOW_LIMIT` steps in a row overflow (the forward pass itself does)."""
        if math.isfinite(value):
            self._overflows = 0
            return
        if self.scaler is None:
            raise self._non_finite_loss(value, self.step + 1)
        self._overflows += 1
        if self._overflows >= OVERFLOW_LIMIT:
            raise self._overflowing(self.step + 1)

    def _non_finite_loss(self, value: float, step: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} for process {self.process.name!r} "
            f"(Q={self.process.Q.detach().tolist()}, D={self.process.D.detach().tolist()}); "
            "lower the learning rates or check the data")

    def _overflowing(self, step: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{OVERFLOW_LIMIT} consecutive fp16 steps up to step {step} had a non-finite loss for process "
            f"{self.process.name!r}: the network's forward pass overflows fp16 (the loss scale cannot help "
            "there); use model.precision bf16 or fp32")

    def _plan(self) -> Optional[HostPlan]:
        """The host-side bounds of a deferred step (None on CPU): B(T), the largest B(t) of a
        training batch (its prior term is at T), and the Van Loan block's 1-norm as last read,
        with :data:`PLAN_HEADROOM` for a learned process, whose Q and D move between reads."""
        if not self.deferred:
            return None
        if self._block_norm is None:
            self._block_norm = float(van_loan_norm(self.process.A.detach(), self.process.D.detach()))
        headroom = PLAN_HEADROOM if self.process_params else 1.0
        return HostPlan(self._block_norm * headroom, self._max_b)

    def _settle(self) -> None:
        """Read the ledger (one transfer): the smoothed loss, and the failures of the steps since
        the last read, raised as the host checks would have raised them at their step."""
        if not self.deferred:
            return
        r = self._ledger.read()
        self._block_norm = None  # re-read with the next step's plan (Q and D moved)
        if r.bad_loss_step is not None:
            raise self._non_finite_loss(r.bad_loss, r.bad_loss_step)
        if r.bad_grad_step is not None:
            raise NonFiniteLossError(f"non-finite gradient at step {r.bad_grad_step}")
        if r.overflow_step is not None:
            raise self._overflowing(r.overflow_step)
        if r.checks["cholesky"] is not None:
            raise CholeskyError(f"transition covariance is not positive definite at step {r.checks['cholesky']} "
                                f"for process {self.process.name!r} (no jitter is added; check the structure)",
                                process=self.process.name, Q=self.process.Q.detach().tolist(),
                                D=self.process.D.detach().tolist())
        if r.checks["radius"] is not None:
            raise NonFiniteLossError(
                f"at step {r.checks['radius']} the norm of Q and D had grown more than {2 * PLAN_HEADROOM:g}x "
                f"since the last read of the device for process {self.process.name!r}: the transition "
                "kernels would be inexact; lower optim.process_lr")
        self.running_loss = r.running_loss

    def _with_grads(self) -> list[torch.nn.Parameter]:
        """The optimizer's parameters (network, then process) that have gradients."""
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _optimizer_step(self) -> None:
        """Clip and step; with fp16's loss scaler: unscale first, and a step whose gradients
        overflowed is skipped (the scaler lowers its scale) instead of failing the run."""
        if self.scaler is None:
            self._clip_gradients()
            self.optimizer.step()
            return
        self.scaler.unscale_(self.optimizer)
        self._clip_gradients(overflow_ok=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _clip_gradients(self, overflow_ok: bool = False) -> None:
        """Scale all gradients (network and process) to a total 2-norm of at most ``optim.grad_clip``.

        The same rule as ``clip_grad_norm_`` (factor min(1, c / (norm + 1e-6))).  On CPU the norm
        is read on the host, which the finiteness check needs anyway, and gradients are multiplied
        only when the factor is below 1: the multiply-by-one of every step cost as much as the
        norm on CPU (0.35 of 0.9 ms per digits step).  Deferred (a GPU), the factor stays on the
        device and multiplies every step (by exactly 1 when not clipping: the same bits), and the
        finiteness goes to the ledger.  A non-finite norm is an error, unless ``overflow_ok`` (the
        fp16 scaler skips that step)."""
        params = self._with_grads()
        total = _total_norm([p.grad for p in params])
        max_norm = self.config.optim.grad_clip
        if self.deferred:
            if not overflow_ok:
                self._ledger.add_grad_norm(total, self.step + 1)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
            return
        norm = float(total)
        if not math.isfinite(norm):
            if overflow_ok:
                return
            raise NonFiniteLossError(f"non-finite gradient at step {self.step + 1}")
        if max_norm / (norm + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)

    def evaluate(self, split: str = "val", n_examples: Optional[int] = None, n_t: Optional[int] = None) -> dict:
        """BPD of the reported (EMA) model on the first ``n_examples`` of ``split`` with ``n_t``
        time strata (default ``train.eval_n_t``) and the evaluation seed; see
        :func:`~.inference.evaluate_model` (the processes of a group share the examples, and
        every process gets the numbers).  Repeated at the same step, the same numbers."""
        tc = self.config.train
        n_t = tc.eval_n_t if n_t is None else int(n_t)
        data = getattr(self.data, split)
        if n_examples is not None:
            data = data[:n_examples]
        key = (split, self.step, int(data.shape[0]), n_t)
        if self._last_eval is not None and self._last_eval[0] == key:
            return dict(self._last_eval[1])  # same weights, same data, same seed: same numbers
        res = evaluate_model(self, data, self.data.levels, time_sampler=self.eval_sampler, n_t=n_t,
                             seed=tc.eval_seed, batch_size=tc.eval_batch_size, group=self.group)
        self._last_eval = (key, dict(res))
        return res

    # ------------------------------------------------------------------ decisions of rank 0
    def _on_main(self, decide: Callable[[], int]) -> int:
        """``decide()`` on rank 0 (an int >= 0), its result on every process.  What it raises
        is raised there, and on the other processes as StopTraining (a StopTraining) or
        :class:`MainFailed` (anything else): no process is left waiting for the others."""
        code, error = 0, None
        if self.is_main:
            try:
                code = decide()
            except StopTraining as exc:
                code, error = _STOPPED, exc
            except Exception as exc:  # any failure: shared first, then raised here
                code, error = _FAILED, exc
        code = self.group.share(code)
        if error is not None:
            raise error
        if code == _STOPPED:
            raise StopTraining(f"stopped by rank 0 at step {self.step}")
        if code == _FAILED:
            raise MainFailed(f"rank 0 failed at step {self.step}")
        return code

    def _report(self, step: int, row: dict) -> None:
        """The callback with one evaluation, on rank 0; a StopTraining it raises stops every process."""
        if self.callback is None and self.group.world == 1:
            return

        def call() -> int:
            if self.callback is not None:  # (rank 0's; the other processes have none)
                self.callback(step, dict(row))
            return 0

        self._on_main(call)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (see :func:`.state.run_state`)."""
        return run_state(self)

    def load_state_dict(self, state: dict, *, training: bool = True) -> None:
        """Restore a :meth:`state_dict` (of a run with the same parameterization); ``training=False``:
        the model alone, for evaluation and sampling (see :func:`.state.restore_run`)."""
        restore_run(self, state, training=training)

    def save(self) -> None:
        save_checkpoint(self.out_dir / CHECKPOINT, self.state_dict())

    def progress(self) -> "RunProgress":
        """Where the run stands, complete or stopped early (what a search records of it)."""
        return RunProgress(step=self.step, history=list(self.history), best_val=self.best_val,
                           train_seconds=self.train_seconds, n_params=self.n_params)

    def try_resume(self) -> bool:
        """Continue from the checkpoint in ``out_dir`` if there is one: False when there is none or
        it was damaged (set aside, the run starts again); a different configuration is an error.
        Rank 0 decides (and sets a damaged file aside); the other processes then read the same file."""
        resumed = bool(self._on_main(lambda: int(self._resume_from_checkpoint())))
        if resumed and not self.is_main:
            self.load_state_dict(load_checkpoint(self.out_dir / CHECKPOINT, map_location="cpu"))
        return resumed

    def _resume_from_checkpoint(self) -> bool:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        try:
            # on the host: the generator states must stay CPU byte tensors; weights move when loaded
            state = load_checkpoint(path, map_location="cpu")
        except UNREADABLE as exc:  # torn or damaged at rest: start this run again from scratch
            set_aside(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return False
        differ = config_mismatch(upgrade_saved_config(state["config"]), self.config.model_dump(mode="json"))
        if differ:
            raise ConfigError(f"{path}: checkpoint was written by a different configuration ({', '.join(differ[:5])}"
                              f"{', ...' if len(differ) > 5 else ''}); use another --out")
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> dict:
        """Train to ``train.steps`` (from the checkpoint with ``resume``), then :meth:`finish`."""
        tc = self.config.train
        self._start_files()
        if resume:
            self.try_resume()
        if self.residual is not None and self.is_main:
            artifacts.write_residual_stats(self.out_dir, self.residual)
        if self.step == 0 and self.is_main:
            artifacts.start_coupling(self.out_dir, self.process)  # coupling.json: the initial process
            log.info("process %s (n=%d, %s), network %d params, dataset %s %s", self.process.name, self.process.n,
                     "learned" if self.process_params else "fixed", self.n_params, self.data.name, self.data.shape)
        bar = _progress(tc, self.step) if self.is_main else None
        if self.deferred:
            self._ledger = StepLedger(self.device, self.running_loss)
        while self.step < tc.steps:
            # ranks 1.. reseed their global stream (dropout) from (seed, rank, step): a resumed
            # run draws the masks the uninterrupted one would have
            self.group.separate_global_rng(tc.stream_seed("init"), self.step)
            t0 = time.perf_counter()
            loss = self._step()
            evaluate = self.step % tc.eval_every == 0 or self.step == tc.steps
            if self.deferred:
                # one read per logging step; the wait for the queued steps is counted as training time
                if evaluate or self.step % READ_EVERY == 0 or (bar is not None and bar.line_due()):
                    self._settle()
            else:
                # smoothed training loss (nats/dim), checkpointed so a resumed curve continues; an
                # fp16 step the scaler skipped (non-finite loss) leaves it as it was
                value = float(loss)
                if math.isfinite(value):
                    self.running_loss = value if self.running_loss is None else 0.98 * self.running_loss + 0.02 * value
            self.train_seconds += time.perf_counter() - t0
            if bar is not None:
                bar.update(self.running_loss, self.best_val)
            if evaluate:
                self._eval_and_checkpoint(self.running_loss)
        if bar is not None:
            bar.close()
        return self.finish()

    def _start_files(self) -> None:
        """The run directory and config.yaml (rank 0)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            artifacts.write_config(self.out_dir, self.config)

    def run(self, *, resume: bool = True, replay: bool = False) -> RunResult:
        """:meth:`fit` for callers that may stop the run early: a callback raising
        :class:`StopTraining` ends it with a result instead of an exception.  ``replay``: after
        resuming, the restored evaluations go through the callback first, so that a pruner
        judges the whole curve, not just the part after a crash."""
        try:
            if resume and self.try_resume() and replay:
                for row in list(self.history):
                    self._report(int(row["step"]), row)
            metrics = self.fit(resume=False)
        except StopTraining as stop:
            return RunResult(False, self.progress(), reason=str(stop) or f"stopped at step {self.step}")
        return RunResult(True, self.progress(), metrics=metrics)

    def _eval_and_checkpoint(self, running_loss: Optional[float]) -> None:
        res = self.evaluate("val", self.config.train.eval_examples)
        self.best_val = min(self.best_val, res["bpd"])
        row = {"step": self.step, "train_loss": running_loss, "val_bpd": res["bpd"], "val_bpd_se": res["bpd_se"],
               "train_seconds": self.train_seconds}
        self.history.append(row)
        self.group.check_replicas(self._replicated(), self.step)
        if self.is_main:
            log.info("step %d  loss %.4f  val_bpd %.4f", self.step,
                     running_loss if running_loss is not None else float("nan"), res["bpd"])
            self.save()
            artifacts.write_history(self.out_dir, self.history)
            artifacts.record_coupling(self.out_dir, self.step, self.process, self.ema)  # (EMA Q, D; tiny)
        self._report(self.step, row)

    def _replicated(self) -> list[torch.Tensor]:
        """What every process of a group holds identically: the weights and their EMA."""
        return [*self.net.parameters(), *self.process_params, *self.ema.shadow]

    # ------------------------------------------------------------------ the end
    def process_summary(self) -> dict:
        """The reported (EMA) process: see :func:`~.artifacts.process_summary`."""
        return artifacts.process_summary(self.process, self.ema)

    def write_samples(self, n: int) -> str:
        """samples.png from ``n`` samples of the reported model; its file name ("" if none)."""
        tc = self.config.train
        return artifacts.write_samples(self.out_dir, self, self.data, n, steps=tc.sample_steps, t_min=tc.t_min,
                                       seed=tc.eval_seed)

    def finish(self) -> dict:
        """Final evaluation (val, then test once; every process), then rank 0's artifacts and metrics."""
        tc = self.config.train
        # the final evaluation ranks runs: both held-out splits with test_n_t strata (paired SE of a
        # difference between two digits runs ~0.005 bpd at 384), validation during training with eval_n_t
        val = self.evaluate("val", n_t=tc.test_n_t)
        test = self.evaluate("test", n_t=tc.test_n_t)
        summary = self.process_summary()
        metrics = self._final_metrics(val, test, summary)
        if not self.is_main:
            return metrics
        artifacts.write_per_example(self.out_dir, val, test, tc.test_n_t)
        artifacts.write_process(self.out_dir, summary, self.step)
        if tc.n_samples > 0:
            metrics["samples"] = self.write_samples(tc.n_samples)
        if tc.quality is not None and self.data.levels is not None:  # (images only: no features for 2-D points)
            metrics.update(self._quality())
            if self.history and self.history[-1].get("step") == self.step:  # the curve ends with the sample quality
                self.history[-1].update(kid=metrics["kid"], kid_se=metrics["kid_se"])
                artifacts.write_history(self.out_dir, self.history)
        artifacts.write_metrics(self.out_dir, metrics)
        log.info("done: val_bpd %.4f test_bpd %.4f (%d steps, %.1fs)", val["bpd"], test["bpd"], self.step, self.train_seconds)
        return metrics

    def _quality(self) -> dict:
        """metrics.json's sample quality: kid, kid_se, fid and how they were measured (``quality``)."""
        start = time.perf_counter()
        q = sample_quality(self, self.config.train.quality, self.data, t_min=self.config.train.t_min)
        seconds = time.perf_counter() - start
        log.info("sample quality: KID %.4g +- %.2g, FID %.4g (%d samples, %s at %d NFE, %.1fs)",
                 q["kid"], q["kid_se"], q["fid"], q["n"], q["sampler"], q["nfe"], seconds)
        return {"kid": q["kid"], "kid_se": q["kid_se"], "fid": q["fid"],
                "quality": {k: v for k, v in q.items() if k not in ("kid", "kid_se", "fid")} | {"seconds": seconds}}

    def _final_metrics(self, val: dict, test: dict, summary: dict) -> dict:
        """metrics.json of the run: the final val and test BPD, the budget and the learned Q, D."""
        tc = self.config.train
        return {
            "dataset": self.data.name, "process": self.process.name, "n_aux": self.process.n_aux,
            "structure_hash": summary["structure_hash"], "steps": self.step, "train_seconds": self.train_seconds,
            "n_params": self.n_params, "val_bpd": val["bpd"], "val_bpd_se": val["bpd_se"], "val_n": val["n"],
            "test_bpd": test["bpd"], "test_bpd_se": test["bpd_se"], "test_n": test["n"],
            "val_n_t": tc.test_n_t, "test_n_t": tc.test_n_t,
            "best_val_bpd": min(self.best_val, val["bpd"]), "prior_kl_per_dim": val["prior_kl_per_dim"],
            "Q": summary["Q"], "D": summary["D"], "levels": self.data.levels, "dim": self.data.dim,
            "coupling": summary["coupling"],  # effective K and structure of the reported process
        }


def _progress(tc, initial: int) -> Optional[StepProgress]:
    """A live bar on a terminal, a log line per tenth of the run elsewhere; nothing without progress."""
    return StepProgress(tc.steps, initial) if tc.progress else None
