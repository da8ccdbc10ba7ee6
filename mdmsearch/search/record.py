"""What a trial (and a study) knows about itself: typed records, read from and written to
Optuna's storage in this module alone.

Optuna keeps a trial's state, parameters, values and times; mdmsearch keeps the rest as user
attributes (the study's journal or database is the only state every executor shares).  No
other module names an attribute key: they read a :class:`TrialRecord` (``TrialRecord.of``,
:func:`records`) and write through :func:`write`, :func:`write_by_id` and :func:`enqueue`;
study-level facts go through :func:`study_get` / :func:`study_set` with a :class:`StudyKey`.
The keys are the ones studies have always stored, so older studies read unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from enum import Enum
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from . import adapters


class Outcome(str, Enum):
    """How a decided trial ended (the leaderboard's ``state`` column)."""

    COMPLETE = "COMPLETE"  # trained to the full budget and evaluated
    PRUNED = "PRUNED"  # stopped early by the pruner / scheduler
    FAIL = "FAIL"  # a decided failure: non-finite loss, failed Cholesky, an I/O error
    INVALID = "INVALID"  # rejected before training (structure cannot reach the target, or no float64 factor)
    DUPLICATE = "DUPLICATE"  # answered from an earlier trial of the same configuration

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Confirmation:
    """A confirmation trial's place in the race (see confirm.py)."""

    group: str  # the configuration (up to the seed) it confirms
    role: str  # incumbent | baseline | challenger
    seed: int  # its fresh training seed
    round: int  # 1, 2, ...


# field of TrialRecord -> the user-attribute key it is stored under (the keys studies have always used)
KEYS = {
    "baseline": "baseline",  # vpsde/cld/alda/malda for an enqueued baseline, else absent
    "artifact_dir": "artifact_dir",  # where the checkpoint, metrics and samples live
    "artifact_id": "artifact_id",  # a retry keeps its first attempt's directory id
    "retry_of": "retry_of",  # the trial a dead worker left, re-queued as this one
    "confirm": "confirm",  # a Confirmation, for confirmation trials
    "config_hash": "config_hash",  # structure + hyperparameters + budget + seed (the dedupe key)
    "config_group": "config_group",  # the same without the seed
    "structure_hash": "structure_hash",  # of an INVALID structure (answers its repeats)
    "outcome": "outcome",  # an Outcome (INVALID is told to Optuna as PRUNED)
    "final": "final",  # the outcome is decided (counts as finished)
    "reason": "reason",  # why it failed, was pruned, is invalid or a duplicate
    "failed_reason": "failed_reason",  # why recovery failed it (a dead worker)
    "duplicate_of": "duplicate_of",  # the trial whose result answers it
    "test_bpd": "test_bpd",
    "steps": "steps",
    "worker": "worker",  # {host, pid[, ray_node]}: where the trial's (latest) attempt runs
    "heartbeat": "heartbeat",  # {pid, host, time, trial}: the last beat of a running trial (database storages)
}


@dataclass(frozen=True)
class TrialRecord:
    """One trial: Optuna's part and mdmsearch's attributes, typed."""

    number: int
    trial_id: int
    state: TrialState
    params: dict
    values: Optional[list]
    intermediate_values: dict
    datetime_start: Optional[datetime]
    datetime_complete: Optional[datetime]
    baseline: Optional[str] = None
    artifact_dir: Optional[str] = None
    artifact_id: Optional[int] = None
    retry_of: Optional[int] = None
    confirm: Optional[Confirmation] = None
    config_hash: Optional[str] = None
    config_group: Optional[str] = None
    structure_hash: Optional[str] = None
    outcome: Optional[Outcome] = None
    final: bool = False
    reason: Optional[str] = None
    failed_reason: Optional[str] = None
    duplicate_of: Optional[int] = None
    test_bpd: Optional[float] = None
    steps: Optional[int] = None
    worker: Optional[dict] = None
    heartbeat: Optional[dict] = None

    @classmethod
    def of(cls, trial) -> "TrialRecord":
        """The record of a live ``optuna.Trial`` or a ``FrozenTrial``."""
        attrs = trial.user_attrs
        own = {name: attrs.get(key) for name, key in KEYS.items()}
        own["final"] = bool(own["final"])
        own["confirm"] = Confirmation(**own["confirm"]) if own["confirm"] else None
        own["outcome"] = Outcome(own["outcome"]) if own["outcome"] else None
        frozen = trial if isinstance(trial, optuna.trial.FrozenTrial) else None
        return cls(number=trial.number, trial_id=adapters.trial_id(trial),
                   state=frozen.state if frozen else TrialState.RUNNING, params=dict(trial.params),
                   values=list(frozen.values) if frozen and frozen.values else None,
                   intermediate_values=dict(frozen.intermediate_values) if frozen else {},
                   datetime_start=trial.datetime_start, datetime_complete=frozen.datetime_complete if frozen else None,
                   **own)

    # ------------------------------------------------------------------ what the life cycle asks
    @property
    def decided(self) -> bool:
        """Finished with a decided outcome (interrupted trials that were re-queued are not)."""
        return self.state.is_finished() and self.final

    @property
    def failed(self) -> bool:
        """A decided failure (an INVALID structure, told as pruned, is not one)."""
        return self.decided and self.state == TrialState.FAIL and (self.outcome or Outcome.FAIL) == Outcome.FAIL

    @property
    def duplicate(self) -> bool:
        return self.outcome == Outcome.DUPLICATE

    @property
    def trained(self) -> bool:
        """Decided, trained to completion and evaluated (not answered from another trial)."""
        return self.decided and self.outcome == Outcome.COMPLETE and bool(self.values)

    @property
    def shown_state(self) -> str:
        """mdmsearch's state: the outcome when decided, INTERRUPTED when finished undecided."""
        if not self.state.is_finished():
            return self.state.name
        return self.outcome.value if self.decided and self.outcome else (
            self.state.name if self.decided else "INTERRUPTED")


def _stored(value: Any) -> Any:
    """A field value as stored (JSON): enums by value, a Confirmation as a mapping."""
    if isinstance(value, Confirmation):
        return asdict(value)
    if isinstance(value, Enum):
        return value.value
    return value


def _attrs(values: dict) -> dict:
    unknown = set(values) - set(KEYS)
    if unknown:
        raise KeyError(f"not a trial record field: {sorted(unknown)}")
    return {KEYS[name]: _stored(v) for name, v in values.items()}


def write(trial: optuna.Trial, **values) -> None:
    """Record fields on a live trial, e.g. ``write(trial, outcome=Outcome.PRUNED, final=True)``."""
    for key, value in _attrs(values).items():
        trial.set_user_attr(key, value)


def write_by_id(study: optuna.Study, trial_id: int, **values) -> None:
    """Record fields on a trial another process asked (recovery); RuntimeError once finished."""
    for key, value in _attrs(values).items():
        adapters.set_trial_attr(study, trial_id, key, value)


def enqueue(study: optuna.Study, params: dict, **values) -> None:
    """Queue a trial with fixed parameters and record fields (a baseline, a retry, a confirmation)."""
    study.enqueue_trial(dict(params), user_attrs=_attrs(values))


def records(study: optuna.Study, states: Optional[tuple] = None) -> list[TrialRecord]:
    """Every trial of the study (or those in ``states``) as records, by number."""
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]


def record_fields() -> list[str]:
    return [f.name for f in fields(TrialRecord)]


# ---------------------------------------------------------------------- the study's own facts
class StudyKey(str, Enum):
    """Study-level user attributes."""

    SPEC = "spec"  # the normalized spec it was created with
    SPEC_HASH = "spec_hash"
    CREATED_AT = "created_at"
    N_TRIALS = "n_trials"  # the latest run's target (status, ETA)
    WORKERS = "workers"
    EXECUTOR = "executor"
    CONFIRM_PLAN = "confirm_plan"  # the frozen confirmation candidates
    CONFIRMATION = "confirmation"  # the confirmation's result, once it has ended
    CONFIRM_ONLY = "confirm_only"  # {"of": study, "steps": S}: a study that only confirms another's winner


def study_get(study: optuna.Study, key: StudyKey, default: Any = None) -> Any:
    return study.user_attrs.get(key.value, default)


def study_set(study: optuna.Study, key: StudyKey, value: Any) -> None:
    study.set_user_attr(key.value, value)


__all__ = ["Confirmation", "KEYS", "Outcome", "StudyKey", "TrialRecord", "enqueue", "record_fields", "records",
           "study_get", "study_set", "write", "write_by_id"]
