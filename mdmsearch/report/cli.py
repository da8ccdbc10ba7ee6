"""`mdmsearch report`: HTML + Markdown reports from the Parquet leaderboard.

Wire it into the main parser with ``add_report_command(sub)``."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_report_command(sub) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse sub-parsers object; returns the new parser."""
    p = sub.add_parser("report", help="HTML/Markdown report per dataset (reports/<dataset>/index.html)",
                       description="Build reports/<dataset>/index.html and README.md from the leaderboard: "
                                   "ranked table with the baselines, search progress, BPD by structure, "
                                   "parameter importances, learned Q/D, learning curves and samples.")
    p.add_argument("--dataset", default=None, help="one dataset (default: every dataset with results)")
    p.add_argument("--root", default="studies/leaderboard", help="leaderboard tree (default: studies/leaderboard)")
    p.add_argument("--studies-dir", default="studies", help="where the Optuna studies live (default: studies)")
    p.add_argument("--storage", default=None, help="the studies' storage URL if not their journal files under "
                   "--studies-dir (e.g. postgresql+psycopg://user:pass@host/db)")
    p.add_argument("--out", default="reports", help="output directory; each dataset goes to OUT/<dataset>/")
    p.add_argument("--top", type=int, default=5, help="learned structures shown in the table and figures")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Handler of ``mdmsearch report``; MDMError (one line) for a missing or empty leaderboard."""
    from ..preflight import normalize_storage
    from .build import build_reports

    datasets = [args.dataset] if args.dataset else None
    storage = normalize_storage(args.storage, None) if args.storage else None  # one line if unreachable
    paths = build_reports(args.root, args.out, studies_dir=args.studies_dir, top=args.top, datasets=datasets,
                          storage=storage)
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0
