"""Named crash points at the boundaries of a trial's end, for deterministic crash tests.

A trial ends in four writes, in this order (:func:`mdmsearch.search.runner.run_claimed`)::

    row written -> decided (outcome attrs) -> told (Optuna state) -> released (heartbeat dropped)

A process can die between any two of them.  Whatever the moment, the next run must leave every
leaderboard row agreeing with the study (:func:`mdmsearch.search.lifecycle.recover`).  To test
each boundary without a timing race, ``MDMSEARCH_FAILPOINT=<boundary>`` makes the process that
reaches that boundary SIGKILL itself there, exactly as ``kill -9`` would: no ``finally``, no
``atexit``, no flush.  Unset (always, outside crash tests) a failpoint is one dictionary lookup.
The variable reaches Ray workers through the environment they inherit from ``ray.init``.
"""

from __future__ import annotations

import logging
import os
import signal
from enum import Enum

log = logging.getLogger(__name__)

ENV = "MDMSEARCH_FAILPOINT"


class TrialEnd(str, Enum):
    """The boundaries of a trial's end, in the order they are passed."""

    ROW_WRITTEN = "row-written"  # the leaderboard row is on disk; the study knows nothing yet
    DECIDED = "decided"  # the outcome attributes are set on the (still RUNNING) trial
    TOLD = "told"  # Optuna has the trial's final state; its heartbeat file is still there
    RELEASED = "released"  # the heartbeat file is gone: the trial's end is complete

    def __str__(self) -> str:
        return self.value


def failpoint(boundary: TrialEnd) -> None:
    """SIGKILL this process if ``MDMSEARCH_FAILPOINT`` names ``boundary``."""
    if os.environ.get(ENV) != boundary.value:
        return
    log.warning("failpoint %s: killing process %d", boundary.value, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "TrialEnd", "failpoint"]
