"""Reports: one self-contained ``index.html`` + GitHub ``README.md`` per dataset, regenerated
from the Parquet leaderboard tree, the learning curves, trial artifacts and Optuna studies.

    from mdmsearch.report import build_report
    build_report("studies/leaderboard", "digits", "reports")   # -> reports/digits/index.html
"""

_EXPORTS = {"build_report": ".build", "build_reports": ".build", "aggregate": ".data", "datasets_in": ".data",
            "leaderboard_table": ".data", "margin_sentence": ".data"}
__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy: the command line imports this package without loading pandas and matplotlib up front
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
