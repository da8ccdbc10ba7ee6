"""Running trials: the objective shared by all executors, the local worker loop and
``--workers N`` worker processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import optuna
import torch
from optuna.trial import TrialState

from .. import __version__
from ..config import resolve_parameterization
from ..data import DataBundle, load_dataset
from ..errors import MDMError
from ..leaderboard import mask_json, write_curve, write_trial
from ..training import StopTraining, Trainer
from ..training.checkpoint import atomic_write_json
from .confirm import Step, next_step, plan_overrides
from .failpoints import TrialEnd, failpoint
from .plan import TrialPlan, suggest_plan
from .spec import SearchSpec
from .lifecycle import ARTIFACT_ATTR, Deadline, Outcome, artifact_dir, claim, recover, release, tell
from .space import finite_size
from .study import FINAL_ATTR, OUTCOME_ATTR, Heartbeat, count_trials, open_study, record_run, stop_reason, study_lock

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    state: Outcome
    values: Optional[list[float]]
    row: dict


_DATA_CACHE: dict[str, DataBundle] = {}


def load_data(spec: SearchSpec) -> DataBundle:
    d = spec.data
    key = d.model_dump_json()
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(d.name, data_dir=d.data_dir, seed=d.seed, n_train=d.n_train,
                                        n_val=d.n_val, n_test=d.n_test, download=d.download, **d.options)
    return _DATA_CACHE[key]


def _base_row(spec: SearchSpec, number: int, plan: TrialPlan, executor: str, started: datetime) -> dict:
    q_nnz, d_nnz = plan.nnz()
    return {
        "trial": number, "baseline": plan.baseline, "seed": plan.seed,
        "process": plan.baseline or "learned", "n_aux": plan.n_aux, "q_pattern": plan.q_pattern,
        "d_pattern": plan.d_pattern, "d_param": plan.d_param, "learn": plan.learn,
        "q_mask": mask_json(plan.q_mask) if plan.q_mask else None,
        "d_mask": mask_json(plan.d_mask) if plan.d_mask else None, "q_nnz": q_nnz, "d_nnz": d_nnz,
        "structure_hash": plan.structure_hash(spec),
        "config_hash": plan.config_hash(spec), "config_group": plan.config_hash(spec, with_seed=False),
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


def find_duplicate(study: optuna.Study, config_hash: str, own_number: int):
    """An earlier trial of the same configuration that completed or was pruned (its answer is
    known: training it again would spend budget on no new information)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.state == TrialState.PRUNED and not t.user_attrs.get(FINAL_ATTR):
            continue
        if (t.number != own_number and t.user_attrs.get("config_hash") == config_hash
                and t.user_attrs.get("duplicate_of") is None):
            return t
    return None


def find_running_twin(study: optuna.Study, config_hash: str, own_number: int):
    """An earlier trial of the same configuration that another worker is training right now:
    training it twice in parallel buys no information (parallel workers can propose the same
    point, constant liar or not).  The earlier trial wins; its twin is answered without a value."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if (t.number < own_number and t.user_attrs.get("config_hash") == config_hash
                and t.user_attrs.get("duplicate_of") is None):
            return t
    return None


def find_invalid(study: optuna.Study, structure_hash: str, own_number: int):
    """An earlier trial rejected as INVALID with the same structure (its hyperparameters do
    not matter: the structure itself cannot train)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if (t.number != own_number and t.user_attrs.get(OUTCOME_ATTR) == Outcome.INVALID
                and t.user_attrs.get("structure_hash") == structure_hash):
            return t
    return None


def execute_trial(trial, spec: SearchSpec, *, executor: str = "local", study: Optional[optuna.Study] = None,
                  report: Optional[Callable[[int, dict], None]] = None) -> TrialOutcome:
    """Run one trial end to end and write its leaderboard row.  ``trial`` is a claimed Optuna
    trial; ``report(step, metrics)`` is how intermediate values reach the pruner (Optuna's
    ``trial.report`` + ``should_prune`` by default, for every executor)."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    number = trial.number
    baseline = trial.user_attrs.get("baseline") if hasattr(trial, "user_attrs") else None
    plan = suggest_plan(trial, spec, baseline=baseline, **plan_overrides(spec, trial.user_attrs))
    art_dir = artifact_dir(spec, trial)
    artifact_id = trial.user_attrs.get("artifact_id", number)
    row = _base_row(spec, number, plan, executor, started)
    row["retry_of"] = trial.user_attrs.get("retry_of")
    row["artifact_dir"] = str(art_dir)
    trial.set_user_attr("config_hash", row["config_hash"])
    trial.set_user_attr("config_group", row["config_group"])  # (its seeds are one configuration)
    trial.set_user_attr(ARTIFACT_ATTR, str(art_dir))
    trial.set_user_attr("artifact_id", artifact_id)

    def done(state: Outcome, values, reason: Optional[str] = None, **extra) -> TrialOutcome:
        row.update(state=state.value, reason=reason, wall_seconds=time.perf_counter() - t0,
                   finished_at=datetime.now(timezone.utc), **extra)
        try:
            write_trial(spec.leaderboard_root, spec.data.name, spec.study, row)
        except OSError as exc:  # full disk: the study still learns the outcome; the row can be rebuilt
            log.warning("trial %d: leaderboard row not written (%s); once there is space, "
                        "`mdmsearch rebuild %s` writes it", number, exc, spec.study)
        failpoint(TrialEnd.ROW_WRITTEN)  # (a death from here on is told from the row by recover())
        trial.set_user_attr(OUTCOME_ATTR, state.value)
        trial.set_user_attr(FINAL_ATTR, True)
        if reason:
            trial.set_user_attr("reason", reason)
        failpoint(TrialEnd.DECIDED)
        return TrialOutcome(state, values, row)

    check = plan.check(spec)
    if not check.valid:
        first = find_invalid(study, row["structure_hash"], number) if study is not None else None
        if first is not None:  # known to be invalid: answered, not counted toward n_trials
            trial.set_user_attr("duplicate_of", first.number)
            return done(Outcome.DUPLICATE, None, reason=f"duplicate of trial {first.number}, invalid: {check.reason}",
                        duplicate_of=first.number)
        log.info("trial %d: invalid structure rejected before training: %s", number, check.reason)
        trial.set_user_attr("structure_hash", row["structure_hash"])
        return done(Outcome.INVALID, None, reason=check.reason)
    if study is not None:
        dup = find_duplicate(study, row["config_hash"], number)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup.number)
            log.info("trial %d duplicates trial %d: answered from its result", number, dup.number)
            first = dup.user_attrs
            if dup.state == TrialState.PRUNED:  # told as pruned again, without a value
                return done(Outcome.DUPLICATE, None, reason=f"duplicate of trial {dup.number}, which was pruned",
                            duplicate_of=dup.number, steps=first.get("steps"))
            return done(Outcome.DUPLICATE, list(dup.values), duplicate_of=dup.number, val_bpd=dup.values[0],
                        test_bpd=first.get("test_bpd"), steps=first.get("steps"))
        twin = find_running_twin(study, row["config_hash"], number)
        if twin is not None:  # told like a duplicate of a pruned trial: no value (its twin brings it)
            trial.set_user_attr("duplicate_of", twin.number)
            log.info("trial %d duplicates trial %d, which is still training: not trained twice", number, twin.number)
            return done(Outcome.DUPLICATE, None, reason=f"duplicate of trial {twin.number}, which was still training",
                        duplicate_of=twin.number)

    config = plan.run_config(spec)
    reporter = report or _optuna_reporter(trial, prunable=not plan.baseline, last_step=config.train.steps)
    trainer = None
    try:
        atomic_write_json(art_dir / "plan.json", {"plan": plan.__dict__, "trial": number})
        with Heartbeat(art_dir, number):
            trainer = Trainer(config, art_dir, callback=reporter, data=load_data(spec))
            result = trainer.run(resume=True, replay=True)  # the pruner sees the curve from before a crash
    except MDMError as exc:  # NaN loss, failed Cholesky, invalid process: a decided failure
        log.warning("trial %d failed: %s", number, exc)
        return done(Outcome.FAIL, None, reason=str(exc))
    except OSError as exc:  # disk full, quota, I/O error writing checkpoints or artifacts
        reason = f"cannot write trial artifacts: {exc.strerror or exc} (errno {exc.errno})"
        log.warning("trial %d failed: %s (%s)", number, reason, exc.filename or art_dir)
        return done(Outcome.FAIL, None, reason=reason, steps=trainer.progress().step if trainer is not None else None)
    run = result.progress
    _write_curve(spec, number, run.history)
    if not result.completed:
        return done(Outcome.PRUNED, None, reason=result.reason, val_bpd=run.last_val, best_val_bpd=run.best_val,
                    steps=run.step, train_seconds=run.train_seconds, n_params=run.n_params)
    metrics = result.metrics
    trial.set_user_attr("test_bpd", metrics["test_bpd"])
    trial.set_user_attr("steps", metrics["steps"])
    values = [metrics["val_bpd"]]
    if spec.objective.second:
        values.append(float(metrics[spec.objective.second]))
    return done(Outcome.COMPLETE, values, val_bpd=metrics["val_bpd"], val_bpd_se=metrics["val_bpd_se"],
                test_bpd=metrics["test_bpd"], best_val_bpd=metrics["best_val_bpd"],
                prior_kl_per_dim=metrics["prior_kl_per_dim"], steps=metrics["steps"],
                train_seconds=metrics["train_seconds"], n_params=metrics["n_params"],
                Q=_json(metrics["Q"]), D=_json(metrics["D"]))


def _write_curve(spec: SearchSpec, number: int, history: list[dict]) -> None:
    try:
        write_curve(spec.curves_root, spec.data.name, spec.study, number, history)
    except OSError as exc:  # the trial's result stands; `mdmsearch rebuild` writes the curve later
        log.warning("trial %d: learning curve not written (%s)", number, exc)


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
    """A claimed trial from plan to release, wherever it runs: execute, tell, drop the claim.
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
        log.info("worker %d: trial %d (%d/%d finished)", worker, trial.number, counts["finished"], spec.n_trials)
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
                 space_size: Optional[int]) -> None:
    from ..logs import route_optuna, setup_logging

    _die_with_parent()
    setup_logging(**log_options, tag=f"w{worker}")
    route_optuna()
    spec = SearchSpec.model_validate_json(spec_json)
    worker_loop(spec, worker, allow_spec_change, space_size)


def run_local(spec: SearchSpec, *, allow_spec_change: bool = False, verbose: bool = False,
              log_options: Optional[dict] = None) -> dict:
    """Run the study with ``spec.workers`` processes on this machine; returns the final counts."""
    study = open_study(spec, allow_spec_change=allow_spec_change)  # validates/creates once, up front
    record_run(study, spec, "local")  # for `mdmsearch status` (ETA)
    t0 = time.perf_counter()
    space_size = finite_size(spec)  # once, for every worker
    if spec.workers == 1:
        worker_loop(spec, 0, allow_spec_change, space_size)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(spec.model_dump_json(), i, allow_spec_change,
                                                                 log_options or {"verbose": verbose}, space_size),
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
