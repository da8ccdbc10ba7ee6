"""The outer loop: search-space specs, Optuna studies, executors, leaderboards."""

from .plan import TrialPlan, suggest_plan
from .runner import execute_trial, run_local, worker_loop
from .spec import SearchSpec, load_spec, parse_spec
from .study import count_trials, open_study, recover_stale

__all__ = ["SearchSpec", "load_spec", "parse_spec", "TrialPlan", "suggest_plan", "execute_trial", "run_local",
           "worker_loop", "open_study", "recover_stale", "count_trials"]
