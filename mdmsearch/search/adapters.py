"""Every private name of a dependency that mdmsearch uses, in one place.

Checked on the versions in :data:`CHECKED_ON`; ``tests/test_adapters.py`` fails when an
installed version leaves that range or one of these names disappears, so an upgrade breaks a
test here instead of a study at run time.  Everything else in the package uses public APIs.

Why each is needed:
* Optuna ``Trial(study, trial_id)`` / ``trial._trial_id`` / ``study._storage``: a Ray trial runs
  in another process than the one that asked it and must report intermediate values to, and
  tell, *that* trial; a dead worker's RUNNING trial is failed by id before its retry is queued.
  Optuna has no public API to reopen an asked trial elsewhere.
* Ray ``OptunaSearch`` internals: the searcher asks trials from the study's own storage under
  mdmsearch's lock (claim, stop rule, time budget) and keeps OptunaSearch's define-by-run
  bookkeeping and checkpointing.
* Ray ``ray.train._internal.session.get_session``: the function trainable's thread, joined on
  cleanup so that a trial stopped by the scheduler writes its PRUNED row before its actor is
  reused.
"""

from __future__ import annotations

from typing import Any, Optional

import optuna

CHECKED_ON = {"optuna": ("4.0", "5.0"), "ray": ("2.41", "2.60")}  # inclusive (major.minor)


# ---------------------------------------------------------------------- Optuna
def trial_id(trial) -> int:
    """The storage id of a Trial or FrozenTrial (numbers are per study, ids per storage)."""
    return int(trial._trial_id)


def storage_of(study: optuna.Study):
    return study._storage


def reopen_trial(study: optuna.Study, trial_id_: int) -> optuna.Trial:
    """A live Trial for a trial asked by another process (to report and tell it)."""
    return optuna.trial.Trial(study, trial_id_)


def set_trial_attr(study: optuna.Study, trial_id_: int, key: str, value: Any) -> None:
    storage_of(study).set_trial_user_attr(trial_id_, key, value)


def trial_attrs(study: optuna.Study, trial_id_: int) -> dict:
    return storage_of(study).get_trial_user_attrs(trial_id_)


def fail_trial(study: optuna.Study, trial_id_: int) -> None:
    """Set a RUNNING trial to FAIL by id; RuntimeError if it finished meanwhile."""
    from optuna.trial import TrialState

    storage_of(study).set_trial_state_values(trial_id_, TrialState.FAIL)


# ---------------------------------------------------------------------- Ray Tune
def searcher_trials(searcher) -> dict:
    """OptunaSearch: Tune trial id -> the Optuna trial it asked."""
    return searcher._ot_trials


def searcher_study(searcher) -> optuna.Study:
    return searcher._ot_study


def searcher_config(searcher, ot_trial) -> dict:
    """OptunaSearch: run the define-by-run space on an asked trial; the Tune config it gives."""
    return searcher._suggest_from_define_by_run_func(searcher._space, ot_trial)


def searcher_completed(searcher, tune_trial_id: str) -> None:
    searcher._completed_trials.add(tune_trial_id)


def training_thread() -> Optional[Any]:
    """The thread running the current function trainable (None outside one)."""
    from ray.train._internal.session import get_session

    return getattr(get_session(), "training_thread", None)


def function_trainable(fn, name: str):
    """Tune's function-trainable class for ``fn`` (to subclass its cleanup)."""
    from ray.tune.trainable.function_trainable import wrap_function

    return wrap_function(fn, name=name)


__all__ = ["CHECKED_ON", "fail_trial", "function_trainable", "reopen_trial", "searcher_completed", "searcher_config",
           "searcher_study", "searcher_trials", "set_trial_attr", "storage_of", "trial_attrs", "trial_id",
           "training_thread"]
