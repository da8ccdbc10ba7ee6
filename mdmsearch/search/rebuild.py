"""`mdmsearch rebuild STUDY`: write again the leaderboard rows (and learning curves) that are
missing or unreadable, from the Optuna study and the trial artifacts.

A row is a function of the trial (parameters, state, user attributes) and of what the trial
wrote in its artifact directory (``metrics.json``, ``history.csv``), so a row lost to a disk
error or a copy cut short can be recomputed; readable rows are left alone.
"""

from __future__ import annotations

import csv
import json
import logging
from datetime import timezone
from pathlib import Path
from typing import Optional

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import TrialState

from ..errors import MDMError
from ..leaderboard import trial_path, write_confirmation, write_curve, write_trial
from .confirm import plan_overrides
from .lifecycle import Outcome, artifact_dir, row_path
from .plan import suggest_plan
from .runner import _base_row, _json, coupling_columns, quality_columns
from .spec import SearchSpec
from .record import StudyKey, TrialRecord, records, study_get

log = logging.getLogger(__name__)

METRIC_KEYS = ("val_bpd", "val_bpd_se", "test_bpd", "best_val_bpd", "prior_kl_per_dim", "steps", "train_seconds",
               "n_params")


def spec_of(study: optuna.Study, studies_dir: str, leaderboard_dir: Optional[str] = None) -> SearchSpec:
    """The spec a study was created with (stored in the study), pointed at ``studies_dir``."""
    stored = study_get(study, StudyKey.SPEC)
    if not stored:
        raise MDMError(f"study {study.study_name!r} has no stored spec (not created by mdmsearch run)")
    return SearchSpec.model_validate({**stored, "studies_dir": studies_dir, "leaderboard_dir": leaderboard_dir})


def readable(path: Path) -> bool:
    try:
        pq.read_table(path)
    except (pa.ArrowException, OSError):
        return False
    return True


def _utc(dt):
    return dt.astimezone(timezone.utc) if dt is not None else None


def _state(t: TrialRecord) -> str:
    if t.outcome:
        return t.outcome.value
    return {TrialState.COMPLETE: Outcome.COMPLETE, TrialState.PRUNED: Outcome.PRUNED}.get(t.state, Outcome.FAIL).value


def row_from_trial(spec: SearchSpec, t: TrialRecord, executor: str) -> dict:
    plan = suggest_plan(optuna.trial.FixedTrial(dict(t.params), number=t.number), spec,
                        baseline=t.baseline, **plan_overrides(spec, t))
    row = _base_row(spec, t.number, plan, executor, _utc(t.datetime_start), t.confirm)
    # the identity the trial recorded when it ran wins over today's hash of its plan (dedupe and
    # grouping stay what they were in a study from before a change of what is hashed)
    row.update({k: v for k, v in (("config_hash", t.config_hash), ("config_group", t.config_group)) if v})
    art = artifact_dir(spec, t)
    row.update(state=_state(t), reason=t.reason, retry_of=t.retry_of, duplicate_of=t.duplicate_of, artifact_dir=str(art),
               finished_at=_utc(t.datetime_complete))
    if t.datetime_start and t.datetime_complete:
        row["wall_seconds"] = (t.datetime_complete - t.datetime_start).total_seconds()
    if t.values:
        row["val_bpd"] = t.values[0]
    row["test_bpd"], row["steps"] = t.test_bpd, t.steps
    metrics_path = art / "metrics.json"
    if row["state"] == Outcome.COMPLETE and metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("trial %d: %s unreadable (%s); row rebuilt from the study only", t.number, metrics_path, exc)
        else:
            row.update({k: metrics[k] for k in METRIC_KEYS if k in metrics}, **quality_columns(metrics),
                       **coupling_columns(metrics))
            row.update(Q=_json(metrics.get("Q")), D=_json(metrics.get("D")))
    return row


def read_history(path: Path) -> Optional[list[dict]]:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(fh)]


def rebuild(spec: SearchSpec, study: optuna.Study) -> dict:
    """Rewrite missing/unreadable rows and curves of the decided trials; returns what was done."""
    executor = study_get(study, StudyKey.EXECUTOR, "local")
    rows, curves, kept = [], [], 0
    for t in records(study):
        if not t.decided:
            continue
        row_file = row_path(spec, t.number)
        if row_file.exists() and readable(row_file):
            kept += 1
        else:
            write_trial(spec.leaderboard_root, spec.data.name, spec.study, row_from_trial(spec, t, executor))
            rows.append(t.number)
        curve = trial_path(spec.curves_root, spec.data.name, spec.study, t.number)
        if not (curve.exists() and readable(curve)):
            art = artifact_dir(spec, t)
            history = read_history(art / "history.csv")
            if history:
                write_curve(spec.curves_root, spec.data.name, spec.study, t.number, history)
                curves.append(t.number)
    confirmation = study_get(study, StudyKey.CONFIRMATION)
    if confirmation is not None:  # the ended confirmation the leaderboard and the report lead with
        write_confirmation(spec.leaderboard_root, spec.data.name, spec.study, confirmation)
    return {"study": spec.study, "rows_written": rows, "curves_written": curves, "rows_kept": kept,
            "confirmation_written": confirmation is not None}
