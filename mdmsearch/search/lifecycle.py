"""The pieces of a trial's life cycle that every executor shares, defined once.

    recover (dead workers' trials: told from their row, or re-queued to resume)
      -> claim (ask + artifact directory + heartbeat, under the study lock)
      -> plan -> check -> train -> outcome -> leaderboard row -> tell -> release
                                           (runner.run_claimed, for every executor)

Executors differ only in *where* a trial runs (a local worker process or a Ray actor), never
in what a trial does: the same sampler, the same Optuna pruner, the same rows.  The states a
trial can end in are :class:`Outcome`; paths are :func:`artifact_dir` and :func:`row_path`;
the time budget is a :class:`Deadline`.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta, timezone
from pathlib import Path
from typing import Optional, Sequence

import optuna
from optuna.trial import TrialState

from ..leaderboard import trial_path
from . import adapters
from .record import Outcome, TrialRecord, records, write, write_by_id
from .spec import SearchSpec
from .study import Heartbeat, heartbeat_path, is_stale, retry_trial

log = logging.getLogger(__name__)

def artifact_dir(spec: SearchSpec, trial) -> Path:
    """A trial's artifact directory: the one recorded on it, else ``trials/<artifact_id or number>``
    (a retry keeps its first attempt's artifact id, so it resumes that checkpoint).  ``trial``:
    a :class:`TrialRecord`, or an Optuna ``Trial`` or ``FrozenTrial``."""
    rec = trial if isinstance(trial, TrialRecord) else TrialRecord.of(trial)
    if rec.artifact_dir:
        return Path(rec.artifact_dir)
    return spec.study_dir / "trials" / str(rec.artifact_id if rec.artifact_id is not None else rec.number)


def row_path(spec: SearchSpec, number: int) -> Path:
    """Where trial ``number``'s leaderboard row lives."""
    return trial_path(spec.leaderboard_root, spec.data.name, spec.study, number)


def claim(study: optuna.Study, spec: SearchSpec) -> optuna.Trial:
    """Ask a trial and mark it as taken before the study lock is released: its artifact
    directory and a first heartbeat.  Call under :func:`mdmsearch.search.study.study_lock`."""
    trial = study.ask()
    art = artifact_dir(spec, trial)
    write(trial, artifact_dir=str(art))
    Heartbeat(art, trial.number, study, adapters.trial_id(trial)).beat()
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


def release(spec: SearchSpec, trial) -> None:
    """A told trial is no longer claimed: drop its heartbeat file (a beat in the study ends with the trial)."""
    heartbeat_path(artifact_dir(spec, trial)).unlink(missing_ok=True)


ROW_FIELDS = ("reason", "test_bpd", "steps", "duplicate_of")  # what a trial's end records from its row


def read_row(spec: SearchSpec, trial: TrialRecord) -> Optional[dict]:
    """The leaderboard row trial ``trial`` wrote, or None: no file, or one that is not this
    trial's.  An unreadable file (damaged at rest) or a row older than the trial (left by an
    earlier study of the same name) is set aside, so that it cannot outlive the retry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..io import set_aside

    path = row_path(spec, trial.number)
    if not path.exists():
        return None
    try:
        row = pq.read_table(path).to_pylist()[0]
    except (pa.ArrowException, OSError, IndexError) as exc:
        set_aside(path, f"unreadable leaderboard row: {exc}")
        return None
    started = trial.datetime_start.astimezone(timezone.utc) if trial.datetime_start else None  # (Optuna's: local, naive)
    if started is not None and row.get("started_at") is not None and row["started_at"] < started - ROW_CLOCK_SLACK:
        set_aside(path, f"a row from {row['started_at']}, before trial {trial.number} started ({started})")
        return None
    return row


ROW_CLOCK_SLACK = timedelta(minutes=5)  # clocks of the claiming driver and a Ray node may differ this much


def settle(study: optuna.Study, spec: SearchSpec, trial: TrialRecord) -> Optional[str]:
    """Tell the study the outcome of a RUNNING trial whose worker wrote its leaderboard row and
    died before telling.  Returns the state told, or None when there is no row of this trial.

    The row is the first of a trial's end writes (see :mod:`~mdmsearch.search.failpoints`) and
    is written atomically: once it exists, the trial's outcome is decided, whether or not the
    worker lived to record that on the trial.  The outcome attributes are set from the row,
    then the state is told, so the row and the study agree whatever the moment of death."""
    row = read_row(spec, trial)
    if row is None:
        return None
    values = None
    if row.get("val_bpd") is not None:
        values = [row["val_bpd"]]
        if spec.objective.second is not None:
            values.append(float(row.get(spec.objective.second) or math.nan))
    try:
        write_by_id(study, trial.trial_id, **{k: row[k] for k in ROW_FIELDS if row.get(k) is not None},
                    outcome=Outcome(row["state"]), final=True)
        tell(study, trial.number, row["state"], values)
    except (RuntimeError, ValueError) as exc:  # told meanwhile
        log.debug("trial %d: %s", trial.number, exc)
    else:
        log.warning("trial %d: its worker died after writing its leaderboard row: told %s from the row",
                    trial.number, row["state"])
    return row["state"]


def recover(study: optuna.Study, spec: SearchSpec) -> list[int]:
    """Trials left RUNNING by a dead worker (local process or Ray actor, see
    :func:`~mdmsearch.search.study.is_stale`): told from their leaderboard row if they wrote
    one, else failed and re-queued to resume from their checkpoint.  Returns the re-queued
    numbers.  Call under :func:`~mdmsearch.search.study.study_lock`."""
    retried = []
    for t in records(study, states=(TrialState.RUNNING,)):
        if not is_stale(t) or settle(study, spec, t) is not None:
            continue
        if retry_trial(study, t, "worker died; retried from its checkpoint"):
            retried.append(t.number)
            log.warning("trial %d was left RUNNING by a dead worker: re-queued to resume from its checkpoint", t.number)
    return retried


class Deadline:
    """The spec's time budget: after it, no new trial starts (running ones finish)."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.at = time.time() + seconds if seconds else None

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at


__all__ = ["Deadline", "Outcome", "artifact_dir", "claim", "recover", "release", "read_row", "row_path", "settle",
           "tell"]
