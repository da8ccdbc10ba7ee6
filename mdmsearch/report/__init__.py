"""Reports: one self-contained ``index.html`` + GitHub ``README.md`` per dataset, regenerated
from the Parquet leaderboard tree, the learning curves, trial artifacts and Optuna studies.

    from mdmsearch.report import build_report
    build_report("studies/leaderboard", "digits", "reports")   # -> reports/digits/index.html
"""

from .build import build_report, build_reports
from .data import aggregate, datasets_in, leaderboard_table, margin_sentence

__all__ = ["build_report", "build_reports", "datasets_in", "aggregate", "leaderboard_table", "margin_sentence"]
