"""Training progress that suits its reader: a live bar on a terminal, plain log lines elsewhere.

A bar redrawn at every step is right on a terminal and wrong in a file: a 1000-step digits run
wrote ~2000 carriage-return redraws (190 KB) into every search worker's and CI's log.  When
stderr is not a terminal, :class:`StepProgress` logs one line at every tenth of the run and at
least every ``every_s`` seconds instead.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Optional

log = logging.getLogger("mdmsearch.training.progress")

LINES = 10  # plain lines per run (one per tenth), plus one per every_s seconds at most


class StepProgress:
    """``update(loss, best_val)`` after each step; ``close()`` at the end."""

    def __init__(self, total: int, initial: int = 0, tty: Optional[bool] = None, every_s: float = 60.0):
        self.total, self.step, self.every_s = total, initial, every_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar = None
        self._t0 = self._last = time.monotonic()
        self._start = initial
        self._next = self._boundary(initial)
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", leave=False, dynamic_ncols=True)

    def _boundary(self, step: int) -> int:
        """The first tenth of the run after ``step``."""
        tenth = max(1, self.total // LINES)
        return (step // tenth + 1) * tenth

    def line_due(self) -> bool:
        """Whether the next :meth:`update` writes a log line (a trainer that keeps the loss on the
        device reads it then); a terminal's bar shows the loss as last read."""
        if self._bar is not None:
            return False
        nxt = self.step + 1
        return nxt >= self._next or nxt == self.total or time.monotonic() - self._last >= self.every_s

    def update(self, loss: Optional[float], best_val: float) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", val_bpd=f"{best_val:.4f}")
            return
        now = time.monotonic()
        if self.step >= self._next or self.step == self.total or now - self._last >= self.every_s:
            self._line(now, loss, best_val)
            self._next = self._boundary(self.step)
            self._last = now

    def _line(self, now: float, loss: float, best_val: float) -> None:
        rate = (self.step - self._start) / max(now - self._t0, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else float("nan")
        best = f"{best_val:.4f}" if math.isfinite(best_val) else "not yet evaluated"
        log.info("train: step %d/%d (%d%%), %.1f steps/s, loss %.4f, best val_bpd %s, ETA %.0fs",
                 self.step, self.total, 100 * self.step // max(self.total, 1), rate,
                 loss if loss is not None else float("nan"), best, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
