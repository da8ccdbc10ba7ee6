"""Every private name of a dependency that mdmsearch uses, in one place.

Checked on the versions in :data:`CHECKED_ON` (inclusive, major.minor), which are also the
bounds ``pyproject.toml`` declares: pip installs only versions that were checked, so a new
release cannot turn a fresh install red.  ``tests/test_adapters.py`` checks that the two agree
and tests each name below by its *behaviour* against real storages (a journal file and SQLite;
a trial reopened and told by another process, a running trial failed by id, attributes read
and written), so a release either passes or fails on a named behaviour.  To widen the range:
install the new version, run ``pytest tests/test_adapters.py tests/test_lifecycle.py``, then
raise both this table and the bound in pyproject.toml.  Everything else uses public APIs.

Why each is needed:
* Optuna ``Trial(study, trial_id)`` / ``trial._trial_id`` / ``study._storage``: a Ray trial runs
  in another process than the driver that claimed it and must report intermediate values to,
  and tell, *that* trial; a dead worker's RUNNING trial is failed by id before its retry is
  queued.  Optuna has no public API to reopen an asked trial elsewhere.

Ray: none.  The Ray executor uses only public Tune APIs (a ``Searcher`` subclass, a function
trainable, ``tune.report``); :data:`CHECKED_ON` still names the Ray range it was tested on,
which is the ``ray`` extra's bound in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

import optuna

CHECKED_ON = {"optuna": ("4.0", "5.1"), "ray": ("2.41", "2.60")}  # inclusive (major.minor)


# ---------------------------------------------------------------------- Optuna
def trial_id(trial) -> int:
    """The storage id of a Trial or FrozenTrial (numbers are per study, ids per storage)."""
    return int(trial._trial_id)


def storage_of(study: optuna.Study):
    return study._storage


def reopen_trial(study: optuna.Study, trial_id_: int) -> optuna.Trial:
    """A live Trial for a trial asked by another process (to report and tell it).  The study's
    view of its trials is read first: a database storage caches what it has read, and writes to a
    trial it has not seen yet fail (KeyError in Optuna's cache)."""
    study.get_trials(deepcopy=False)
    return optuna.trial.Trial(study, trial_id_)


def set_trial_attr(study: optuna.Study, trial_id_: int, key: str, value: Any) -> None:
    storage_of(study).set_trial_user_attr(trial_id_, key, value)


def trial_attrs(study: optuna.Study, trial_id_: int) -> dict:
    return storage_of(study).get_trial_user_attrs(trial_id_)


def frozen_trial(study: optuna.Study, trial_id_: int) -> optuna.trial.FrozenTrial:
    """The stored trial with this id, as it is now (its state, attributes and values)."""
    return storage_of(study).get_trial(trial_id_)


def fail_trial(study: optuna.Study, trial_id_: int) -> None:
    """Set a RUNNING trial to FAIL by id; RuntimeError if it finished meanwhile."""
    from optuna.trial import TrialState

    storage_of(study).set_trial_state_values(trial_id_, TrialState.FAIL)


__all__ = ["CHECKED_ON", "fail_trial", "frozen_trial", "reopen_trial", "set_trial_attr", "storage_of", "trial_attrs", "trial_id"]
