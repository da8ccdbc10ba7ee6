"""The training loop's numbers kept on the device between two reads of the host.

A training step has values the host must see: the loss (the smoothed training loss, the
non-finite-loss error), the gradient norm (finite or not), the checks of the process (a failed
Cholesky, the Taylor core's radius: :class:`~mdmsearch.diffusion.ops.HostPlan`).  On CPU
reading them costs nothing (nothing runs ahead of the host) and the trainer reads them every
step.  On a GPU every read waits for all queued kernels, and a small network is then paced by
launches plus round trips; there the trainer writes them into a :class:`StepLedger`, all on
the device, and reads the ledger in one transfer per logging step (an evaluation, a progress
line, at least every :data:`READ_EVERY` steps).  The arithmetic is the host's, in float64, so the
smoothed loss is the same number either way.

A failure found at a read names the step it happened at; the steps after it (until the read)
were computed but nothing of them is saved: the read comes before every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["READ_EVERY", "OVERFLOW_LIMIT", "StepLedger", "Reading"]

READ_EVERY = 100  # steps between two reads at most (also bounds how late a NaN is found)
# consecutive fp16 steps with a non-finite loss that the loss scaler may skip before the run fails:
# a scale that halves from 2^16 reaches 2^-9 by then; a forward pass that still overflows will not heal
OVERFLOW_LIMIT = 25
_NONE = -1  # "no such step" in the int64 step slots


@dataclass(frozen=True)
class Reading:
    """One read of a ledger: the smoothed loss and, for each failure, the first step it occurred
    at (None: it did not), with the loss at the first non-finite one."""

    running_loss: Optional[float]
    bad_loss_step: Optional[int]
    bad_loss: float
    bad_grad_step: Optional[int]
    overflow_run: int  # the longest run of consecutive non-finite losses the scaler skipped
    overflow_step: Optional[int]  # where that run reached OVERFLOW_LIMIT
    checks: dict[str, Optional[int]]  # HostPlan flag -> first step it was raised


class StepLedger:
    """Device scalars updated by every step, read by :meth:`read`.  ``running``: the smoothed
    loss to continue (a resumed run's), as rl <- 0.98 rl + 0.02 loss."""

    CHECKS = ("cholesky", "radius")

    def __init__(self, device: torch.device, running: Optional[float]):
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.running = torch.tensor(running if running is not None else 0.0, **f64)
        self.seen = torch.tensor(running is not None, device=device)  # running holds a loss
        self.bad_loss_step = torch.tensor(_NONE, **i64)
        self.bad_loss = torch.tensor(0.0, **f64)
        self.bad_grad_step = torch.tensor(_NONE, **i64)
        self.overflows = torch.tensor(0, **i64)  # the current run of skipped non-finite losses
        self.overflow_run = torch.tensor(0, **i64)
        self.overflow_step = torch.tensor(_NONE, **i64)
        self.checks = {name: torch.tensor(_NONE, **i64) for name in self.CHECKS}

    @staticmethod
    def _first(slot: torch.Tensor, bad: torch.Tensor, step: int) -> torch.Tensor:
        """``step`` where ``bad`` and no earlier step was recorded, else the slot as it was."""
        return torch.where(bad & (slot < 0), step, slot)

    @torch.no_grad()
    def add_loss(self, loss: torch.Tensor, step: int, skippable: bool) -> None:
        """The step's loss (float64 scalar on the device).  ``skippable`` (fp16 with a loss scaler):
        a non-finite loss is an overflow the scaler skips, and only a run of OVERFLOW_LIMIT fails."""
        finite = torch.isfinite(loss)
        if skippable:
            self.overflows = torch.where(finite, 0, self.overflows + 1)
            self.overflow_run = torch.maximum(self.overflow_run, self.overflows)
            self.overflow_step = self._first(self.overflow_step, self.overflows >= OVERFLOW_LIMIT, step)
        else:
            self.bad_loss = torch.where(~finite & (self.bad_loss_step < 0), loss, self.bad_loss)
            self.bad_loss_step = self._first(self.bad_loss_step, ~finite, step)
        # rl <- 0.98 rl + 0.02 loss, as the host computes it in float64 (two products, one sum);
        # a skipped (non-finite) loss leaves it as it was
        smoothed = torch.where(self.seen, torch.mul(self.running, 0.98) + torch.mul(loss, 0.02), loss)
        taken = finite if skippable else torch.ones_like(finite)
        self.running = torch.where(taken, smoothed, self.running)
        self.seen = self.seen | taken

    @torch.no_grad()
    def add_grad_norm(self, norm: torch.Tensor, step: int) -> None:
        """A gradient norm that must be finite (fp32, bf16: no scaler to skip the step)."""
        self.bad_grad_step = self._first(self.bad_grad_step, ~torch.isfinite(norm), step)

    @torch.no_grad()
    def add_flags(self, flags: dict[str, torch.Tensor], step: int) -> None:
        """A :class:`~mdmsearch.diffusion.ops.HostPlan`'s failed checks of one step."""
        for name, bad in flags.items():
            self.checks[name] = self._first(self.checks[name], bad, step)

    def read(self) -> Reading:
        """Everything, in one device-to-host transfer (the steps as float64: exact below 2^53)."""
        slots = [self.bad_loss_step, self.bad_grad_step, self.overflow_run, self.overflow_step, *self.checks.values()]
        values = torch.stack([self.running, self.bad_loss, self.seen.to(torch.float64),
                              *(s.to(torch.float64) for s in slots)]).tolist()
        running, bad_loss, seen, *steps = values

        def step(v: float) -> Optional[int]:
            return None if v == _NONE else int(v)

        return Reading(running_loss=running if seen else None, bad_loss_step=step(steps[0]),
                       bad_loss=bad_loss, bad_grad_step=step(steps[1]), overflow_run=int(steps[2]),
                       overflow_step=step(steps[3]),
                       checks={name: step(v) for name, v in zip(self.checks, steps[4:])})
