"""The pieces of a trial's life cycle that every executor shares, defined once.

    claim (ask + artifact directory + heartbeat, under the study lock)
      -> plan -> check -> train           (runner.execute_trial, for every executor)
      -> outcome -> leaderboard row -> tell (tell: the one map from an outcome to Optuna)

Executors differ only in *where* a trial runs (a local worker process or a Ray actor) and
how intermediate values reach the pruner, never in what a trial does.  The states a trial
can end in are :class:`Outcome`; paths are :func:`artifact_dir` and :func:`row_path`; the
time budget is a :class:`Deadline`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import optuna
from optuna.trial import TrialState

from ..leaderboard import trial_path
from .spec import SearchSpec
from .study import Heartbeat, Outcome

ARTIFACT_ATTR = "artifact_dir"  # Optuna user attr: where the trial's checkpoint, metrics and samples live


def artifact_dir(spec: SearchSpec, trial) -> Path:
    """A trial's artifact directory: the one recorded on it, else ``trials/<artifact_id or number>``
    (a retry keeps its first attempt's artifact id, so it resumes that checkpoint).  ``trial``:
    an Optuna ``Trial`` or ``FrozenTrial``."""
    recorded = trial.user_attrs.get(ARTIFACT_ATTR)
    if recorded:
        return Path(recorded)
    return spec.study_dir / "trials" / str(trial.user_attrs.get("artifact_id", trial.number))


def row_path(spec: SearchSpec, number: int) -> Path:
    """Where trial ``number``'s leaderboard row lives."""
    return trial_path(spec.leaderboard_root, spec.data.name, spec.study, number)


def claim(study: optuna.Study, spec: SearchSpec, **attrs) -> optuna.Trial:
    """Ask a trial and mark it as taken before the study lock is released: its artifact
    directory, ``attrs`` (e.g. the Ray driver that owns it) and a first heartbeat.  Call under
    :func:`mdmsearch.search.study.study_lock`."""
    trial = study.ask()
    art = artifact_dir(spec, trial)
    trial.set_user_attr(ARTIFACT_ATTR, str(art))
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    Heartbeat(art, trial.number).beat()
    return trial


def tell(study: optuna.Study, trial, state: str, values: Optional[Sequence[float]]) -> None:
    """Tell Optuna a decided outcome: values for a complete trial and for a duplicate of one, a
    pruned state for a pruned trial, an invalid one and a duplicate of either (no value), FAIL
    for a failure.  INVALID is told as pruned, not failed: TPE ignores failed trials, so it kept
    proposing an invalid structure (aux3: 19 of 30 trials); a pruned trial without values ranks
    below every trained one, and the sampler learns to avoid it.  ``trial``: a trial or number."""
    state = Outcome(state)
    if state in (Outcome.COMPLETE, Outcome.DUPLICATE) and values is not None:
        study.tell(trial, list(values))
    elif state in (Outcome.PRUNED, Outcome.DUPLICATE, Outcome.INVALID):
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


class Deadline:
    """The spec's time budget: after it, no new trial starts (running ones finish)."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.at = time.time() + seconds if seconds else None

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at


__all__ = ["ARTIFACT_ATTR", "Deadline", "Outcome", "artifact_dir", "claim", "row_path", "tell"]
