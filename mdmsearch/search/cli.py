"""`mdmsearch run | status | leaderboard` sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MDMError


def add_search_commands(sub) -> None:
    p = sub.add_parser("run", help="start or continue a structure search from a YAML spec")
    p.add_argument("spec", help="search-space YAML, e.g. search_spaces/aux3.yaml")
    p.add_argument("--n-trials", type=int, default=None, help="finished trials the study should reach")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: journal file in studies/<study>/)")
    p.add_argument("--dataset", default=None, help="override the spec's dataset")
    p.add_argument("--studies-dir", default=None, help="where studies live (default: studies/)")
    p.add_argument("--executor", choices=["local", "ray"], default=None)
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray), e.g. auto")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no new trial starts")
    p.add_argument("--allow-spec-change", action="store_true", help="resume a study whose spec changed")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="trials by state, best so far, ETA")
    p.add_argument("study")
    p.add_argument("--studies-dir", default="studies")
    p.add_argument("--storage", default=None)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("leaderboard", help="top structures per dataset from the Parquet leaderboard")
    p.add_argument("--dataset", default=None)
    p.add_argument("--root", default="studies/leaderboard", help="leaderboard tree")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_cmd_leaderboard)


def _load(args):
    """The spec with the flags applied, validated, and the setup checked (storage, directories,
    dataset) before anything is created."""
    from ..preflight import check_search
    from .spec import load_spec

    overrides = {"n_trials": args.n_trials, "workers": args.workers, "storage": args.storage,
                 "dataset": args.dataset, "studies_dir": args.studies_dir, "executor": args.executor,
                 "time_budget_s": args.time_budget}
    spec = load_spec(args.spec, overrides)
    if args.address and spec.executor != "ray":
        raise MDMError(f"--address {args.address}: only with --executor ray (or executor: ray in the spec)")
    return check_search(spec, {k: v is not None for k, v in overrides.items()})


def _cmd_run(args: argparse.Namespace) -> int:
    from ..logs import options as log_options
    from ..logs import route_optuna

    spec = _load(args)
    route_optuna()
    if spec.executor == "ray":
        from .ray_executor import run_ray

        counts = run_ray(spec, address=args.address, allow_spec_change=args.allow_spec_change)
    else:
        from .runner import run_local

        counts = run_local(spec, allow_spec_change=args.allow_spec_change, log_options=log_options(args))
    sys.stdout.write(json.dumps({"study": spec.study, **counts}) + "\n")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import optuna
    from optuna.trial import TrialState

    from ..logs import route_optuna
    from .study import FINAL_ATTR, make_storage

    route_optuna()

    from ..preflight import journal_path, normalize_storage

    url = normalize_storage(args.storage, Path(args.studies_dir) / args.study / "journal.log")
    if journal_path(url) is not None and not journal_path(url).is_file():
        raise MDMError(f"no study {args.study!r} under {args.studies_dir}/ (run `mdmsearch run SPEC.yaml` first)")
    try:
        study = optuna.load_study(study_name=args.study, storage=make_storage(url))
    except KeyError:
        raise MDMError(f"no study {args.study!r} in {url}") from None
    trials = study.get_trials(deepcopy=False)
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    finished = [t for t in trials if t.state.is_finished() and t.user_attrs.get(FINAL_ATTR)]
    target = study.user_attrs.get("n_trials")
    workers = max(1, int(study.user_attrs.get("workers", 1)))
    done_times = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
                  if t.datetime_complete and t.datetime_start and t.state == TrialState.COMPLETE]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    lines = [f"study {args.study}: {len(trials)} trials  " + "  ".join(f"{k}={v}" for k, v in sorted(by_state.items())),
             f"finished (counted): {len(finished)}"]
    if complete:
        best = min(complete, key=lambda t: t.values[0])
        label = best.user_attrs.get("baseline") or f"learned {json.dumps({k: v for k, v in best.params.items()})}"
        lines.append(f"best so far: trial {best.number} val_bpd={best.values[0]:.4f} ({label})")
    if done_times:
        mean = sum(done_times) / len(done_times)
        lines.append(f"mean trial time: {mean:.1f}s")
        if target:
            left = max(0, target - len(finished))
            lines.append(f"ETA for {target} finished trials with {workers} worker(s): {left * mean / workers:.0f}s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..leaderboard import ranked, read_tree

    df = read_tree(args.root, args.dataset)
    view = ranked(df)
    if view.empty:
        raise MDMError("no completed trials in the leaderboard yet")
    out = []
    for ds, part in view.groupby("dataset"):
        part = part.head(args.top)
        cols = ["label", "val_bpd", "val_std", "test_bpd", "n", "steps", "train_seconds", "studies", "trials"]
        if args.format == "csv":
            out.append(part[["dataset"] + cols].to_csv(index=False))
        elif args.format == "json":
            out.append(part[["dataset"] + cols].to_json(orient="records"))
        else:
            with pd.option_context("display.width", 200, "display.max_colwidth", 60):
                out.append(f"== {ds} ==\n" + part[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    sys.stdout.write("\n".join(out) + "\n")
    return 0
