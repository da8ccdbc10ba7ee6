"""The outer loop: search-space specs, Optuna studies, executors, leaderboards."""

_EXPORTS = {"TrialPlan": ".plan", "suggest_plan": ".plan", "execute_trial": ".runner", "run_local": ".runner",
            "worker_loop": ".runner", "SearchSpec": ".spec", "load_spec": ".spec", "parse_spec": ".spec",
            "count_trials": ".study", "open_study": ".study", "recover": ".lifecycle"}
__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy: the command line imports this package without loading torch and Optuna up front
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
