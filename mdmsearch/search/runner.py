"""Running trials: the objective shared by all executors, the local worker loop and
``--workers N`` worker processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from datetime import datetime, timezone
from typing import Callable, Optional

import optuna
import torch
from optuna.trial import TrialState

from .. import __version__
from ..config import resolve_parameterization
from ..data import load_cached
from ..errors import MDMError
from ..io import atomic_write_json
from ..leaderboard import mask_json, write_curve, write_trial
from ..training import Launch, StopTraining
from .confirm import Step, next_step, plan_overrides
from .failpoints import TrialEnd, failpoint
from .gpus import VISIBLE_ENV, check_local_gpus, visible_gpus, worker_gpus
from .plan import TrialPlan, suggest_plan
from .spec import SearchSpec
from .lifecycle import Deadline, artifact_dir, claim, recover, release, tell
from .record import Confirmation, Outcome, TrialRecord, records, write
from .space import finite_size
from .study import (Heartbeat, budget_used, count_trials, open_study, record_run, stop_reason, study_lock,
                    where_running)

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    state: Outcome
    values: Optional[list[float]]
    row: dict


def _base_row(spec: SearchSpec, number: int, plan: TrialPlan, executor: str, started: datetime,
              confirm: Optional[Confirmation] = None) -> dict:
    q_nnz, d_nnz = plan.nnz()
    return {
        "confirm_round": confirm.round if confirm else None, "confirm_role": confirm.role if confirm else None,
        "trial": number, "baseline": plan.baseline, "seed": plan.seed,
        "process": plan.baseline or "learned", "n_aux": plan.n_aux, "q_pattern": plan.q_pattern,
        "d_pattern": plan.d_pattern, "d_param": plan.d_param, "learn": plan.learn,
        "q_mask": mask_json(plan.q_mask) if plan.q_mask else None,
        "d_mask": mask_json(plan.d_mask) if plan.d_mask else None, "q_nnz": q_nnz, "d_nnz": d_nnz,
        "structure_hash": plan.structure_hash(spec),
        # a confirmation trial belongs to the group it was enqueued for (the same hash, unless the study
        # predates a change of what is hashed, e.g. process_lr made inert for baselines)
        "config_hash": plan.config_hash(spec),
        "config_group": confirm.group if confirm else plan.config_hash(spec, with_seed=False),
        "params": _json(plan.params),
        "lr": plan.hyper["lr"], "process_lr": plan.hyper["process_lr"], "gamma": plan.hyper["gamma"],
        "beta_1": plan.hyper["beta_1"], "time_sampler": plan.hyper["time_sampler"],
        **_predictor(plan),
        "budget_steps": spec.budget.steps, "executor": executor, "spec_hash": spec.spec_hash(),
        "started_at": started, "mdmsearch_version": __version__, "torch_version": torch.__version__,
        "optuna_version": optuna.__version__,
    }


def _predictor(plan: TrialPlan) -> dict:
    """The noise predictor the trial trains with ('auto' resolved by its number of auxiliaries)."""
    par = resolve_parameterization(plan.hyper["parameterization"], plan.n_aux)
    return {"parameterization": par, "residual_stats": plan.hyper["residual_stats"] if par == "mixed" else None}


def _json(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def find_duplicate(study: optuna.Study, config_hash: str, own_number: int) -> Optional[TrialRecord]:
    """An earlier trial of the same configuration that completed or was pruned (its answer is
    known: training it again would spend budget on no new information)."""
    for t in records(study, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.state == TrialState.PRUNED and not t.final:
            continue
        if t.number != own_number and t.config_hash == config_hash and t.duplicate_of is None:
            return t
    return None


def find_running_twin(study: optuna.Study, config_hash: str, own_number: int) -> Optional[TrialRecord]:
    """An earlier trial of the same configuration that another worker is training right now:
    training it twice in parallel buys no information (parallel workers can propose the same
    point, constant liar or not).  The earlier trial wins; its twin is answered without a value."""
    for t in records(study, states=(TrialState.RUNNING,)):
        if t.number < own_number and t.config_hash == config_hash and t.duplicate_of is None:
            return t
    return None


def find_invalid(study: optuna.Study, structure_hash: str, own_number: int) -> Optional[TrialRecord]:
    """An earlier trial rejected as INVALID with the same structure (its hyperparameters do
    not matter: the structure itself cannot train)."""
    for t in records(study, states=(TrialState.PRUNED,)):
        if t.number != own_number and t.outcome == Outcome.INVALID and t.structure_hash == structure_hash:
            return t
    return None


@dataclass
class Ending:
    """How a trial ends, before it is written: its outcome, the values told, the row's extra columns."""

    state: Outcome
    values: Optional[list[float]] = None
    reason: Optional[str] = None
    columns: dict = field(default_factory=dict)  # leaderboard columns the outcome fills
    record: dict = field(default_factory=dict)  # TrialRecord fields the outcome sets


@dataclass
class TrialRun:
    """One claimed trial being executed: the trial, its plan, its artifact directory and its row."""

    trial: optuna.Trial
    rec: TrialRecord  # as claimed
    spec: SearchSpec
    plan: TrialPlan
    art_dir: Path
    row: dict
    t0: float


def execute_trial(trial, spec: SearchSpec, *, executor: str = "local", study: Optional[optuna.Study] = None,
                  report: Optional[Callable[[int, dict], None]] = None) -> TrialOutcome:
    """Plan -> check -> train -> outcome -> row, for one claimed Optuna trial.  ``report(step,
    metrics)`` is how intermediate values reach the pruner (Optuna's ``trial.report`` +
    ``should_prune`` by default, for every executor)."""
    run = begin(trial, spec, executor)
    ending = rejected(run, study) or answered(run, study) or train(run, report, study)
    return end(run, ending)


def begin(trial, spec: SearchSpec, executor: str) -> TrialRun:
    """The trial's plan (sampled, or read back for an enqueued trial) and the identity columns
    of its row, recorded on the trial (what dedupe and confirmation read)."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    rec = TrialRecord.of(trial)
    plan = suggest_plan(trial, spec, baseline=rec.baseline, **plan_overrides(spec, rec))
    art_dir = artifact_dir(spec, rec)
    row = _base_row(spec, rec.number, plan, executor, started, rec.confirm)
    row.update(retry_of=rec.retry_of, artifact_dir=str(art_dir))
    write(trial, config_hash=row["config_hash"], config_group=row["config_group"], artifact_dir=str(art_dir),
          artifact_id=rec.artifact_id if rec.artifact_id is not None else rec.number, worker=where_running())
    return TrialRun(trial, rec, spec, plan, art_dir, row, t0)


def rejected(run: TrialRun, study: Optional[optuna.Study]) -> Optional[Ending]:
    """An invalid structure, answered before any training (a known one as a duplicate)."""
    check = run.plan.check(run.spec)
    if check.valid:
        return None
    number = run.trial.number
    first = find_invalid(study, run.row["structure_hash"], number) if study is not None else None
    if first is not None:  # known to be invalid: answered, not counted toward n_trials
        return Ending(Outcome.DUPLICATE, reason=f"duplicate of trial {first.number}, invalid: {check.reason}",
                      columns={"duplicate_of": first.number}, record={"duplicate_of": first.number})
    log.info("trial %d: invalid structure rejected before training: %s", number, check.reason)
    return Ending(Outcome.INVALID, reason=check.reason, record={"structure_hash": run.row["structure_hash"]})


def answered(run: TrialRun, study: Optional[optuna.Study]) -> Optional[Ending]:
    """A configuration already trained (its result) or training elsewhere right now (no value)."""
    if study is None:
        return None
    number, config_hash = run.trial.number, run.row["config_hash"]
    dup = find_duplicate(study, config_hash, number)
    if dup is not None:
        log.info("trial %d duplicates trial %d: answered from its result", number, dup.number)
        mark = {"duplicate_of": dup.number}
        if dup.state == TrialState.PRUNED:  # told as pruned again, without a value
            return Ending(Outcome.DUPLICATE, reason=f"duplicate of trial {dup.number}, which was pruned",
                          columns={**mark, "steps": dup.steps}, record=mark)
        return Ending(Outcome.DUPLICATE, list(dup.values), record=mark,
                      columns={**mark, "val_bpd": dup.values[0], "test_bpd": dup.test_bpd, "steps": dup.steps})
    twin = find_running_twin(study, config_hash, number)
    if twin is not None:  # told like a duplicate of a pruned trial: no value (its twin brings it)
        log.info("trial %d duplicates trial %d, which is still training: not trained twice", number, twin.number)
        return Ending(Outcome.DUPLICATE, reason=f"duplicate of trial {twin.number}, which was still training",
                      columns={"duplicate_of": twin.number}, record={"duplicate_of": twin.number})
    return None


def train(run: TrialRun, report: Optional[Callable[[int, dict], None]], study: Optional[optuna.Study] = None) -> Ending:
    """Train (resuming a dead worker's checkpoint) and evaluate; a decided failure is an outcome."""
    number, spec, art_dir = run.trial.number, run.spec, run.art_dir
    config = run.plan.run_config(spec)
    reporter = report or _optuna_reporter(run.trial, prunable=prunable(run.rec), last_step=config.train.steps)
    trainer = None
    try:
        atomic_write_json(art_dir / "plan.json", {"plan": run.plan.__dict__, "trial": number})
        with Heartbeat(art_dir, number, study, run.rec.trial_id):
            trainer = Launch(config, art_dir, callback=reporter, data=load_cached(spec.data))  # train.devices processes
            result = trainer.run(resume=True, replay=True)  # the pruner sees the curve from before a crash
    except MDMError as exc:  # NaN loss, failed Cholesky, invalid process: a decided failure
        log.warning("trial %d failed: %s", number, exc)
        return Ending(Outcome.FAIL, reason=str(exc))
    except OSError as exc:  # disk full, quota, I/O error writing checkpoints or artifacts
        reason = f"cannot write trial artifacts: {exc.strerror or exc} (errno {exc.errno})"
        log.warning("trial %d failed: %s (%s)", number, reason, exc.filename or art_dir)
        return Ending(Outcome.FAIL, reason=reason,
                      columns={"steps": trainer.progress().step if trainer is not None else None})
    progress = result.progress
    _write_curve(spec, number, progress.history)
    if not result.completed:
        return Ending(Outcome.PRUNED, reason=result.reason, columns={
            "val_bpd": progress.last_val, "best_val_bpd": progress.best_val, "steps": progress.step,
            "train_seconds": progress.train_seconds, "n_params": progress.n_params})
    m = result.metrics
    values = [m["val_bpd"]] + ([float(m[spec.objective.second])] if spec.objective.second else [])
    columns = {k: m[k] for k in ("val_bpd", "val_bpd_se", "test_bpd", "best_val_bpd", "prior_kl_per_dim", "steps",
                                 "train_seconds", "n_params")}
    columns.update(quality_columns(m))
    columns.update(coupling_columns(m))
    return Ending(Outcome.COMPLETE, values, columns={**columns, "Q": _json(m["Q"]), "D": _json(m["D"])},
                  record={"test_bpd": m["test_bpd"], "steps": m["steps"]})


def quality_columns(metrics: dict) -> dict:
    """The leaderboard's sample-quality columns from a run's metrics.json (none if not measured)."""
    if metrics.get("kid") is None:
        return {}
    return {"kid": metrics["kid"], "kid_se": metrics.get("kid_se"), "fid": metrics.get("fid"),
            "quality": _json(metrics.get("quality"))}


def coupling_columns(metrics: dict) -> dict:
    """The leaderboard's effective-structure columns from a run's metrics.json (docs/math.md
    section 9; none for a run written before its coupling was measured)."""
    c = metrics.get("coupling")
    if not c:
        return {}
    return {"eff_n_aux": c["n_eff"], "eff_structure": c["label"], "aux_share": c["share"], "coupling": _json(c)}


def end(run: TrialRun, ending: Ending) -> TrialOutcome:
    """The row first (atomically: once it exists the outcome is decided, see lifecycle.settle),
    then the outcome recorded on the trial."""
    row = run.row
    row.update(state=ending.state.value, reason=ending.reason, wall_seconds=time.perf_counter() - run.t0,
               finished_at=datetime.now(timezone.utc), **ending.columns)
    try:
        write_trial(run.spec.leaderboard_root, run.spec.data.name, run.spec.study, row)
    except OSError as exc:  # full disk: the study still learns the outcome; the row can be rebuilt
        log.warning("trial %d: leaderboard row not written (%s); once there is space, "
                    "`mdmsearch rebuild %s` writes it", run.trial.number, exc, run.spec.study)
    failpoint(TrialEnd.ROW_WRITTEN)  # (a death from here on is told from the row by recover())
    write(run.trial, **ending.record, outcome=ending.state, final=True,
          **({"reason": ending.reason} if ending.reason else {}))
    failpoint(TrialEnd.DECIDED)
    return TrialOutcome(ending.state, ending.values, row)


def _write_curve(spec: SearchSpec, number: int, history: list[dict]) -> None:
    try:
        write_curve(spec.curves_root, spec.data.name, spec.study, number, history)
    except OSError as exc:  # the trial's result stands; `mdmsearch rebuild` writes the curve later
        log.warning("trial %d: learning curve not written (%s)", number, exc)


def prunable(rec: TrialRecord) -> bool:
    """Whether the pruner may stop a trial.  Baselines report (their curves are the pruner's
    yardstick) but run to the end; so do confirmation trials, whose complete results are the
    verdicts (aux3 pruned 4 of 9 at step 250 when they could be)."""
    return not rec.baseline and rec.confirm is None


def _optuna_reporter(trial, prunable: bool = True, last_step: Optional[int] = None):
    """Intermediate values to Optuna's pruner.  Baselines report (their curves are the pruner's
    yardstick) but are never pruned: every executor completes them.  Nor is any trial pruned at
    its ``last_step``: its budget is spent, so it completes (the evaluation there is reported,
    for the pruner's comparisons with later trials)."""
    def report(step: int, metrics: dict) -> None:
        if len(getattr(trial.study, "directions", [None])) > 1:
            return  # Optuna cannot prune multi-objective trials
        trial.report(metrics["val_bpd"], step)
        if last_step is not None and step >= last_step:
            return
        if prunable and trial.should_prune():
            raise StopTraining(f"pruned at step {step}")

    return report


# ---------------------------------------------------------------------- local executor
def tell_outcome(study: optuna.Study, trial, outcome: TrialOutcome) -> None:
    """Record a trial's outcome in the study (see :func:`lifecycle.tell`)."""
    tell(study, trial, outcome.state, outcome.values)


def run_claimed(study: optuna.Study, spec: SearchSpec, trial, executor: str) -> TrialOutcome:
    """A claimed trial from plan to release, wherever it runs (every executor calls this):

        plan -> check -> train -> outcome -> row -> decided -> tell -> release

    An unexpected exception (a bug, not a decided failure) is told as FAIL and re-raised."""
    try:
        outcome = execute_trial(trial, spec, executor=executor, study=study)
    except Exception:
        study.tell(trial, state=TrialState.FAIL)  # not counted, not retried
        raise
    tell_outcome(study, trial, outcome)
    failpoint(TrialEnd.TOLD)
    release(spec, trial)
    failpoint(TrialEnd.RELEASED)
    return outcome


_UNKNOWN = object()  # space size not computed yet
CONFIRM_POLL_SECONDS = 2.0  # a worker waiting for a confirmation round to end looks again after this


def worker_loop(spec: SearchSpec, worker: int = 0, allow_spec_change: bool = False, space_size=_UNKNOWN) -> int:
    """Ask/run/tell until the study has ``spec.n_trials`` finished trials.  Returns trials run."""
    torch.set_num_threads(spec.budget.threads)
    study = open_study(spec, allow_spec_change=allow_spec_change, worker=worker)
    ran = repeats = 0
    if space_size is _UNKNOWN:  # (run_local enumerates the space once for all its workers)
        space_size = finite_size(spec)
    deadline = Deadline(spec.time_budget_s)
    while True:
        if deadline.passed():
            log.info("worker %d: time budget of %.0fs used up", worker, spec.time_budget_s)
            break
        with study_lock(spec):
            recover(study, spec)
            counts = count_trials(study)
            reason = stop_reason(study, spec, counts, space_size, repeats)
            step = Step.CLAIM if reason is None else next_step(study, spec)  # the search is done: confirm
            if step is Step.DONE:
                (log.info if reason.startswith("n_trials=") else log.warning)("worker %d: stopping: %s", worker, reason)
                break
            if step is Step.CLAIM:
                trial = claim(study, spec)  # before releasing the lock: the artifact dir + a first heartbeat
        if step is Step.WAIT:  # this confirmation round's last trials run in another worker
            time.sleep(CONFIRM_POLL_SECONDS)
            continue
        log.info("worker %d: trial %d (%d/%d counted%s)", worker, trial.number, budget_used(counts), spec.n_trials,
                 f", {counts['confirmation']} confirming" if counts["confirmation"] else "")
        outcome = run_claimed(study, spec, trial, "local")
        ran += 1
        repeats = repeats + 1 if outcome.state in (Outcome.DUPLICATE, Outcome.INVALID) else 0
        _log_outcome(worker, outcome)
    return ran


def describe_outcome(outcome: TrialOutcome) -> str:
    """One line for the log: 'trial 7 COMPLETE learned K=1 Q:full D:diag val_bpd=2.0504'."""
    r = outcome.row
    label = r["baseline"] or f"learned K={r['n_aux']} Q:{r['q_pattern']} D:{r['d_pattern']}"
    bpd = r.get("val_bpd")
    tail = f" val_bpd={bpd:.4f}" if isinstance(bpd, float) else (f" ({r.get('reason')})" if r.get("reason") else "")
    return f"trial {r['trial']} {outcome.state} {label}{tail}"


def _log_outcome(worker: int, outcome: TrialOutcome) -> None:
    log.info("worker %d: %s", worker, describe_outcome(outcome))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this worker when the `mdmsearch run` process dies (even by
    SIGKILL), so that a killed run leaves no orphan workers; their trials are recovered by the
    next run (dead pid)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_main(spec_json: str, worker: int, allow_spec_change: bool, log_options: dict,
                 space_size: Optional[int], gpus: Optional[str] = None) -> None:
    from ..logs import route_optuna, setup_logging

    if gpus is not None:  # this worker's GPUs (search/gpus.py), before anything initializes CUDA here
        os.environ[VISIBLE_ENV] = gpus
    _die_with_parent()
    setup_logging(**log_options, tag=f"w{worker}")
    route_optuna()
    spec = SearchSpec.model_validate_json(spec_json)
    worker_loop(spec, worker, allow_spec_change, space_size)


def run_local(spec: SearchSpec, *, allow_spec_change: bool = False, verbose: bool = False,
              log_options: Optional[dict] = None) -> dict:
    """Run the study with ``spec.workers`` processes on this machine; returns the final counts.
    Workers spread over the visible GPUs when the trials train on GPUs (search/gpus.py)."""
    visible = visible_gpus()
    check_local_gpus(spec, visible)  # GPUs asked for and absent: one line, before anything is created
    study = open_study(spec, allow_spec_change=allow_spec_change)  # validates/creates once, up front
    record_run(study, spec, "local")  # for `mdmsearch status` (ETA)
    t0 = time.perf_counter()
    space_size = finite_size(spec)  # once, for every worker
    if spec.workers == 1:
        worker_loop(spec, 0, allow_spec_change, space_size)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(spec.model_dump_json(), i, allow_spec_change,
                                                                 log_options or {"verbose": verbose}, space_size,
                                                                 worker_gpus(spec, i, visible)),
                             name=f"mdmsearch-worker-{i}") for i in range(spec.workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise MDMError(f"{len(bad)} worker(s) exited with errors {bad}; re-run the same command to continue")
    counts = count_trials(study)
    counts["wall_seconds"] = time.perf_counter() - t0
    return counts
