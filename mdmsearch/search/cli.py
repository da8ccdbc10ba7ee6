"""`mdmsearch run | status | confirm | rebuild | leaderboard` sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import MDMError


def add_search_commands(sub) -> None:
    p = sub.add_parser("run", help="start or continue a structure search from a YAML spec")
    p.add_argument("spec", help="search-space YAML, e.g. search_spaces/aux3.yaml")
    p.add_argument("--n-trials", type=int, default=None, help="finished trials the study should reach")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine")
    p.add_argument("--storage", default=None, help="journal:PATH, PATH.log (journal file) or an SQLAlchemy URL such as sqlite:///optuna.db (default: studies/<study>/journal.log)")
    p.add_argument("--dataset", default=None, help="override the spec's dataset")
    p.add_argument("--studies-dir", default=None, help="where studies live (default: studies/)")
    p.add_argument("--executor", choices=["local", "ray"], default=None, help="local processes or Ray Tune")
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray), e.g. auto")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no new trial starts")
    p.add_argument("--allow-spec-change", action="store_true", help="resume a study whose spec changed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the space (distinct structures after aliasing, invalid ones with reasons, "
                        "hyperparameter choices, configurations) and a measured time estimate; run nothing")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="trials by state, best so far, ETA")
    p.add_argument("study", help="study name (the spec's `study:`)")
    p.add_argument("--studies-dir", default="studies", help="where studies live (default: studies/)")
    p.add_argument("--storage", default=None, help="storage URL if not the study's journal file (as given to run)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="text lines or one JSON object")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("rebuild", help="rewrite missing or damaged leaderboard rows from the study and trial artifacts")
    p.add_argument("study", help="study name (the spec's `study:`)")
    p.add_argument("--studies-dir", default="studies", help="where studies live (default: studies/)")
    p.add_argument("--storage", default=None, help="storage URL if not the study's journal file (as given to run)")
    p.add_argument("--leaderboard-dir", default=None, help="leaderboard tree (default: STUDIES_DIR/leaderboard)")
    p.set_defaults(func=_cmd_rebuild)

    p = sub.add_parser("confirm", help="train a finished study's winner, best baseline and runners-up on fresh seeds")
    p.add_argument("study", help="study name (the spec's `study:`)")
    p.add_argument("--top", type=int, default=None, help="searched configurations confirmed: the winner and the next "
                                                         "best (default: as the study's race, else 2)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fresh seeds at most per configuration, >= 2; more than the race had reopens it (default: as "
                        "many as the study's race had, else 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the confirmation (default: the study's budget; another value trains "
                        "the candidates anew in the study STUDY.stepsS and says whether the ranking holds)")
    p.add_argument("--test-n-t", type=int, default=None,
                   help="strata of the confirmation trials' final evaluation (default: the study's budget.test_n_t)")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine (default: the spec's)")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="local processes or Ray Tune")
    p.add_argument("--studies-dir", default="studies", help="where studies live (default: studies/)")
    p.add_argument("--storage", default=None, help="storage URL if not the study's journal file (as given to run)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="text lines or one JSON object")
    p.set_defaults(func=_cmd_confirm)

    p = sub.add_parser("leaderboard", help="top structures per dataset from the Parquet leaderboard")
    p.add_argument("--dataset", default=None, help="one dataset (default: all)")
    p.add_argument("--root", default="studies/leaderboard", help="leaderboard tree (default: studies/leaderboard)")
    p.add_argument("--top", type=int, default=20, help="rows per dataset")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table, csv, or json (one array of records over all datasets)")
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
    if args.address:
        from .ray_executor import check_address

        check_address(args.address)
    return check_search(spec, {k: v is not None for k, v in overrides.items()})


def _cmd_run(args: argparse.Namespace) -> int:
    from ..logs import options as log_options
    from ..logs import route_optuna

    spec = _load(args)
    if args.dry_run:
        from .space import describe, enumerate_space, estimate_time

        summary = enumerate_space(spec)
        sys.stdout.write(describe(spec, summary, estimate_time(spec, summary)) + "\n")
        return 0
    route_optuna()
    if spec.executor == "ray":
        from .ray_executor import run_ray

        counts = run_ray(spec, address=args.address, allow_spec_change=args.allow_spec_change)
    else:
        from .runner import run_local

        counts = run_local(spec, allow_spec_change=args.allow_spec_change, log_options=log_options(args))
    sys.stdout.write(json.dumps({"study": spec.study, **counts}) + "\n")
    if counts.get("failed"):
        return _report_failures(spec, counts)
    return 0


def _report_failures(spec, counts: dict) -> int:
    """A study with FAILed trials is not a successful run: exit 1 with how many and why."""
    import optuna

    from .study import failure_summary, make_storage, storage_url

    study = optuna.load_study(study_name=spec.study, storage=make_storage(storage_url(spec)))
    sys.stderr.write(f"mdmsearch: error: {counts['failed']} of {counts['decided']} decided trials FAILED "
                     f"({failure_summary(study)}); see `mdmsearch status {spec.study}`\n")
    return 1


def _existing_study(args: argparse.Namespace):
    """Load the study named on the command line (status, rebuild); one line if there is none."""
    import optuna

    from ..logs import route_optuna
    from ..preflight import journal_path, normalize_storage
    from .study import make_storage

    route_optuna()
    url = normalize_storage(args.storage, Path(args.studies_dir) / args.study / "journal.log")
    if journal_path(url) is not None and not journal_path(url).is_file():
        raise MDMError(f"no study {args.study!r} under {args.studies_dir}/ (run `mdmsearch run SPEC.yaml` first)")
    try:
        return optuna.load_study(study_name=args.study, storage=make_storage(url))
    except KeyError:
        raise MDMError(f"no study {args.study!r} in {url}") from None


def _cmd_confirm(args: argparse.Namespace) -> int:
    """Confirm a study's winner after the fact (see :func:`mdmsearch.search.confirm.prepare`)."""
    import optuna

    from .confirm import describe, prepare, rank_agreement
    from .record import StudyKey, study_get
    from .rebuild import spec_of
    from .study import make_storage, storage_url

    if (args.seeds is not None and args.seeds < 2) or min(args.top or 1, args.steps or 1, args.workers or 1,
                                                            args.test_n_t or 1) < 1:
        raise MDMError("confirm: --seeds must be >= 2; --top, --steps, --test-n-t and --workers >= 1")
    study = _existing_study(args)
    spec = spec_of(study, args.studies_dir).model_copy(update={"storage": args.storage, "executor": args.executor})
    # defaults: the race the study already ran (its frozen plan), else 2 configurations on 3 seeds
    plan = study_get(study, StudyKey.CONFIRM_PLAN) or {}
    seeds = args.seeds or (plan.get("horizons") or [3])[-1]
    top = args.top or (1 + sum(c["role"] == "challenger" for c in plan["candidates"]) if plan else 2)
    spec.confirm.test_n_t = args.test_n_t
    if args.workers:
        spec = spec.model_copy(update={"workers": args.workers})
    spec = prepare(spec, study, top_k=top, seeds=seeds, steps=args.steps)
    if spec.executor == "ray":
        from .ray_executor import run_ray

        counts = run_ray(spec)
    else:
        from .runner import run_local

        counts = run_local(spec)
    confirmed = optuna.load_study(study_name=spec.study, storage=make_storage(storage_url(spec)))
    info = {"study": spec.study, "steps": spec.budget.steps, "result": study_get(confirmed, StudyKey.CONFIRMATION),
            "ranking": rank_agreement(confirmed), "counts": counts}
    if args.format == "json":
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        sys.stdout.write("\n".join(_confirm_lines(info, describe)) + "\n")
    return 1 if counts.get("failed") else 0


def _confirm_lines(info: dict, describe) -> list[str]:
    rank = info["ranking"]
    lines = [f"study {info['study']} ({info['steps']} steps): {describe(info['result'] or {})}"]
    for r in rank["candidates"]:
        fresh = f"{r['fresh_val']:.4f} over {r['fresh_seeds']} fresh seed(s)" if r["fresh_val"] is not None else "—"
        lines.append(f"  {r['role']:<10} {r['label']}: search {r['search_val']:.4f}, fresh {fresh}")
    tau = rank["kendall_tau"]
    lines.append(f"ranking on fresh seeds vs the search's: Kendall tau {tau:.2f}" if tau is not None else
                 "ranking: fewer than two candidates with fresh results")
    searched = [r for r in rank["candidates"] if r["role"] != "baseline" and r["fresh_val"] is not None]
    if searched:
        first = min(searched, key=lambda r: r["fresh_val"])
        lines.append(f"lowest fresh-seed mean validation BPD among the searched candidates: {first['label']} "
                     f"({first['role']}); the search's winner is still the best searched configuration: "
                     f"{'yes' if rank['incumbent_first'] else 'no'} (the winner is decided by the verdicts above, "
                     f"not by this mean)")
    return lines


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from .rebuild import rebuild, spec_of

    study = _existing_study(args)
    result = rebuild(spec_of(study, args.studies_dir, args.leaderboard_dir), study)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    study = _existing_study(args)
    info = study_status(study)
    info["structure"] = structure_status(study, args.studies_dir)
    info["effective"] = effective_status(study, args.studies_dir)
    if args.format == "json":
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        sys.stdout.write("\n".join(_status_lines(info) + _effective_lines(info["effective"])) + "\n")
    return 0


def study_status(study) -> dict:
    """Counts by state, decided trials with FAILs apart, the best trial, timing and ETA."""
    from optuna.trial import TrialState

    from .answer import best_searched, study_spec, winner, winner_line
    from .record import StudyKey, records, study_get
    from .study import budget_used, count_trials, failure_summary

    trials = records(study)
    by_state: dict[str, int] = {}
    for t in trials:  # mdmsearch's outcome (INVALID and DUPLICATE are told to Optuna as PRUNED/COMPLETE)
        by_state[t.shown_state] = by_state.get(t.shown_state, 0) + 1
    counts = count_trials(study)
    info = {"study": study.study_name, "trials": len(trials), "states": dict(sorted(by_state.items())),
            "finished": counts["finished"], "failed": counts["failed"], "running": counts["running"],
            "duplicates": counts["duplicates"], "counted": budget_used(counts) - counts["running"],
            "confirmation_trials": counts["confirmation"],
            "waiting": counts["waiting"], "target": study_get(study, StudyKey.N_TRIALS),
            "workers": max(1, int(study_get(study, StudyKey.WORKERS, 1))),
            "executor": study_get(study, StudyKey.EXECUTOR),
            "failures": failure_summary(study) if counts["failed"] else None, "best": None,
            "mean_trial_seconds": None, "eta_seconds": None, "confirmation": confirmation_status(study)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    spec = study_spec(study)
    found = winner(study, spec)
    info["winner"] = found.as_dict() if found else None
    info["winner_line"] = winner_line(found)
    searched = best_searched(study, spec)  # search trials only: no baseline, no confirmation trial
    if searched:
        info["best"] = {"trial": searched.trial, "val_bpd": searched.val_bpd, "label": searched.label,
                        "seeds": searched.seeds}
    times = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete
             if t.datetime_complete and t.datetime_start and not t.duplicate]
    if times:
        info["mean_trial_seconds"] = sum(times) / len(times)
        if info["target"]:
            left = max(0, int(info["target"]) - info["counted"])  # duplicates do not count
            info["eta_seconds"] = left * info["mean_trial_seconds"] / info["workers"]
    return info


def structure_status(study, studies_dir: str) -> Optional[dict]:
    """The best searched structure's verdict against the best baseline, over the seeds in the
    study's leaderboard rows (None without readable rows or without both)."""
    from ..leaderboard import ranked, read_files
    from .rebuild import spec_of

    try:
        spec = spec_of(study, studies_dir)
        part = spec.leaderboard_root / f"dataset={spec.data.name}" / f"study={study.study_name}"
        rows = read_files(part, spec.leaderboard_root)
    except MDMError:
        return None
    rows["dataset"] = spec.data.name
    if "confirm_round" in rows.columns:  # the search's seeds only: what chose the best searched configuration
        rows = rows[rows["confirm_round"].isna()]
    view = ranked(rows)
    learned = view[view["baseline"].isna()] if not view.empty else view
    if learned.empty or learned.iloc[0]["verdict"] is None:
        return None
    best = learned.iloc[0]
    se, lo, hi = best["vs_baseline_se"], best["ci_low"], best["ci_high"]
    return {"label": best["label"], "seeds": int(best["n"]), "vs_baseline": float(best["vs_baseline"]),
            "se": None if se != se else float(se), "ci_low": None if lo != lo else float(lo),
            "ci_high": None if hi != hi else float(hi), "p_better": float(best["p_better"]), "verdict": best["verdict"]}


def effective_status(study, studies_dir: str, top: int = 3) -> Optional[dict]:
    """What training made of the ``top`` ranked configurations' structures (docs/math.md section 9):
    each one's searched and effective K, effective structure and auxiliaries' share of the precision
    about x0, and how many learned ones collapsed (effective K < K).  None without readable rows."""
    import pandas as pd

    from ..leaderboard import ranked, read_confirmations, read_files, with_effective
    from .rebuild import spec_of

    try:
        spec = spec_of(study, studies_dir)
        rows = read_files(spec.leaderboard_root / f"dataset={spec.data.name}" / f"study={study.study_name}",
                          spec.leaderboard_root)
    except MDMError:
        return None
    rows["dataset"] = spec.data.name
    mine = {key: info for key, info in read_confirmations(spec.leaderboard_root, spec.data.name).items()
            if key[1] == study.study_name}  # ranked as the leaderboard ranks: the confirmed winner first
    view = with_effective(rows, ranked(rows, confirmations=mine))
    if view.empty or view["eff_n_aux"].isna().all():
        return None
    best = view.head(top)
    configs = [{"label": r["label"], "n_aux": int(r["n_aux"]),
                "eff_n_aux": None if pd.isna(r["eff_n_aux"]) else int(r["eff_n_aux"]),
                "eff_structure": r["eff_structure"],
                "aux_share": None if pd.isna(r["aux_share"]) else float(r["aux_share"]),
                "learned": not isinstance(r["baseline"], str)}
               for r in best.to_dict("records")]
    learned = [c for c in configs if c["learned"] and c["n_aux"] > 0 and c["eff_n_aux"] is not None]
    collapsed = [c for c in learned if c["eff_n_aux"] < c["n_aux"]]
    return {"top": configs, "learned": len(learned), "collapsed": len(collapsed)}


def _effective_lines(eff: Optional[dict]) -> list[str]:
    """The status lines of :func:`effective_status`: a headline when top configurations collapsed,
    then one line per top configuration, searched K -> effective K."""
    if not eff:
        return []
    n = len(eff["top"])
    if eff["collapsed"]:
        lines = [f"what training made of the structures: {eff['collapsed']} of the {eff['learned']} learned "
                 f"configuration(s) among the top {n} collapse to a smaller effective structure "
                 "(auxiliaries switched off; see docs/math.md section 9)"]
    elif eff["learned"]:
        lines = [f"what training made of the structures (top {n}): every learned one keeps its auxiliaries"]
    else:
        lines = [f"what training made of the structures (top {n}):"]
    for i, c in enumerate(eff["top"], 1):
        eff_k = "?" if c["eff_n_aux"] is None else c["eff_n_aux"]
        share = "" if c["aux_share"] is None else f", aux share {c['aux_share']:.3f}"
        lines.append(f"  {i}. searched K={c['n_aux']} -> effective K={eff_k}: {c['eff_structure']}{share}  "
                     f"({c['label']})")
    return lines


def confirmation_status(study) -> Optional[dict]:
    """The confirmation on fresh seeds: its result once ended, else the round it is in."""
    from .confirm import describe
    from .record import StudyKey, records, study_get

    result = study_get(study, StudyKey.CONFIRMATION)
    if result:
        return {**result, "line": f"confirmed: {describe(result)}"}
    if study_get(study, StudyKey.CONFIRM_PLAN):
        rounds = max((t.confirm.round for t in records(study) if t.confirm), default=0)
        return {"done": False, "rounds": rounds, "line": f"confirming the winner on fresh seeds: round {rounds}"}
    return None


def _status_lines(info: dict) -> list[str]:
    lines = [f"study {info['study']}: {info['trials']} trials  "
             + "  ".join(f"{k}={v}" for k, v in info["states"].items()),
             f"finished: {info['finished']}; counted toward n_trials: {info['counted']}"
             + (f" of {info['target']}" if info["target"] else "")
             + (f" (duplicates answered without training: {info['duplicates']})" if info["duplicates"] else "")]
    if info["failed"]:
        lines.append(f"FAILED: {info['failed']} ({info['failures']})")
    w = info.get("winner")
    lines.append(info["winner_line"])
    if w:
        lines.append(f"{info['study']}/best = trial {w['trial']} ({w['why']})")
    confirmation = info["confirmation"]
    if confirmation and not confirmation.get("done"):
        lines.append(confirmation["line"])
    elif confirmation and not confirmation.get("winner"):
        lines.append(confirmation["line"])  # ended without a winner: why
    st = info.get("structure")
    if st and not (w and w["source"] == "confirmation"):  # (confirmed: the winner line is the verdict)
        se = f" [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]" if st.get("ci_low") is not None else ""
        lines.append(f"best searched configuration vs best baseline over the search's seeds ({st['seeds']} "
                     f"seed{'s' if st['seeds'] != 1 else ''}, including those that selected it): "
                     f"{st['vs_baseline']:+.4f}{se} bpd, P(better) {st['p_better']:.2f}: {st['verdict']} "
                     f"({st['label']})")
    if info["best"] and w and w["source"] == "confirmation":  # (unconfirmed, the winner line says it)
        b, n = info["best"], len(info["best"]["seeds"])
        lines.append(f"best so far (search trials): {b['label']}: mean val_bpd={b['val_bpd']:.4f} over {n} "
                     f"seed{'s' if n != 1 else ''} (trial {b['trial']} is its best seed)")
    if info["mean_trial_seconds"] is not None:
        lines.append(f"mean trial time: {info['mean_trial_seconds']:.1f}s")
    if info["eta_seconds"] is not None:
        lines.append(f"ETA for {info['target']} counted trials with {info['workers']} worker(s): "
                     f"{info['eta_seconds']:.0f}s")
    return lines


LEADERBOARD_COLUMNS = ["tier", "label", "seeds", "n", "val_bpd", "val_std", "test_bpd", "vs_baseline", "ci_low",
                       "ci_high", "ci_level", "verdict", "margin_on", "p_better", "all_val_bpd", "all_n", "steps", "train_seconds",
                       "studies", "trials"]


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..leaderboard import with_effective

    from ..leaderboard import ranked, read_confirmations, read_tree
    from .confirm import headline

    df = read_tree(args.root, args.dataset)
    confirmations = read_confirmations(args.root, args.dataset)
    view = ranked(df, confirmations=confirmations)
    if view.empty:
        raise MDMError("no completed trials in the leaderboard yet")
    view = with_effective(df, view)  # effective K next to the searched K (docs/math.md section 9)
    cols = list(LEADERBOARD_COLUMNS)
    if view["eff_n_aux"].notna().any():
        cols[cols.index("label") + 1:cols.index("label") + 1] = ["n_aux", "eff_n_aux", "eff_structure"]
    if "kid" in view.columns and view["kid"].notna().any():  # sample quality, where trials measured it
        cols.insert(cols.index("steps"), "kid")
    parts = [part.head(args.top) for _, part in view.groupby("dataset")]
    if args.format == "json":  # one JSON document (an array of records), whatever the number of datasets
        records = []
        for part in parts:
            records.extend(json.loads(part[["dataset"] + cols].to_json(orient="records", double_precision=15)))
        sys.stdout.write(json.dumps(records) + "\n")
        return 0
    if args.format == "csv":
        sys.stdout.write(pd.concat(parts)[["dataset"] + cols].to_csv(index=False))
        return 0
    out = []
    for part in parts:
        dataset = part["dataset"].iloc[0]
        heads = [f"{study}: {headline(info)}" for (ds, study), info in sorted(confirmations.items()) if ds == dataset]
        with pd.option_context("display.width", 250, "display.max_colwidth", 90):
            out.append("\n".join([f"== {dataset} ==", *heads,
                                   part[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")]))
    sys.stdout.write("\n".join(out) + "\n")
    return 0
