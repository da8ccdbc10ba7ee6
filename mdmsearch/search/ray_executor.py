"""The Ray Tune executor: ``mdmsearch run SPEC --executor ray [--address ADDR]``.

Same search space, objective and study as the local executor:

* trials are asked from the study in the spec's Optuna storage by
  ``ray.tune.search.optuna.OptunaSearch`` with the define-by-run function
  :func:`mdmsearch.search.plan.suggest_plan` (baselines enqueued by :func:`open_study`
  are WAITING trials, which ``Study.ask`` hands out first);
* each Tune trial re-attaches to its Optuna trial and runs :func:`execute_trial` with
  ``executor="ray"``: the trial itself writes its leaderboard row and tells the study, so
  nothing is lost if the driver dies;
* claiming, the stop rule (n_trials without duplicates, an exhausted finite space), the time
  budget, paths and telling are the shared life cycle (:mod:`mdmsearch.search.lifecycle`);
* the spec's pruner becomes a Tune scheduler (ASHA for median / successive_halving /
  hyperband, FIFO for none) that never stops a baseline; intermediate ``val_bpd`` goes to
  Tune with ``tune.report`` at every evaluation, with the trial's checkpoint as a
  ``tune.Checkpoint``;
* the experiment lives under ``studies/<study>/ray/run-<k>``; re-running the command after
  the driver was killed restores it with ``Tuner.restore`` and finishes the study.

A trial stopped by the scheduler gets ``SystemExit`` inside ``tune.report`` (that is how
Tune ends function trainables); a driver-side callback marks the Optuna trial
(``tune_stopped``) before Tune stops the actor, so the trial can tell a scheduler stop
(PRUNED, written to the leaderboard) from a shutdown of the experiment (left RUNNING, to
be resumed).  The private Ray and Optuna names this needs are in :mod:`.adapters`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from ..errors import MDMError
from ..training.checkpoint import checkpoint_step
from ..training.trainer import CHECKPOINT
from .plan import suggest_plan
from .spec import SearchSpec
from . import adapters
from .lifecycle import Deadline, artifact_dir, claim, row_path, tell
from .space import finite_size
from .study import (FINAL_ATTR, Heartbeat, count_trials, is_stale, make_sampler, make_storage, open_study,
                    budget_used, pid_alive, record_run, recover_stale, retry_trial, stop_reason, storage_url,
                    study_lock, tried_configs)

log = logging.getLogger(__name__)

RAY_HINT = 'the Ray executor needs Ray: pip install -e ".[ray]"'
EXPERIMENT_PREFIX = "run-"
DONE_MARKER = ".mdmsearch-done"  # written into an experiment directory once its fit() returned
STUDY_MARKER = ".mdmsearch-study"  # which study (its creation time) an experiment belongs to
STOP_ATTR = "tune_stopped"  # Optuna user attr: step at which Tune's scheduler stopped the trial
DRIVER_ATTR = "ray_driver"  # Optuna user attr: {host, pid} of the Ray driver that owns the trial
TUNE_CHECKPOINT_DIR = "tune-checkpoint"  # inside a trial's artifact dir: what is reported to Tune
METRIC = "val_bpd"
TIME_ATTR = "step"
MAX_ROUNDS = 100

try:  # Ray is optional: run_ray() says how to install it
    from ray.tune import Callback
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    _HAVE_RAY = True
except ImportError:  # pragma: no cover - exercised without Ray installed
    _HAVE_RAY = False

_IN_REPORT = threading.Event()  # set while the trial thread waits inside tune.report
# a searcher restored from an experiment checkpoint carries the spec of the run that created it:
# the current run_ray call's n_trials and time budget are kept here, per study (driver process)
_TARGETS: dict[str, int] = {}  # study -> n_trials of the current run_ray call
_DEADLINES: dict[str, Deadline] = {}  # study -> the current run's time budget


def _past_deadline(study: str) -> bool:
    return study in _DEADLINES and _DEADLINES[study].passed()


class _Interrupted(BaseException):
    """The experiment is shutting down (not a scheduler stop): leave the trial RUNNING."""


def _import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise MDMError(RAY_HINT) from None
    return ray


# ---------------------------------------------------------------------- spec helpers
def _absolute_url(url: Optional[str]) -> Optional[str]:
    """Relative journal paths and sqlite files, made absolute for workers with another cwd."""
    if url is None:
        return None
    if url.startswith("journal:"):
        return "journal:" + str(Path(url[len("journal:"):]).resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rest = url[len("sqlite:///"):]
        if rest and rest != ":memory:":
            return "sqlite:///" + str(Path(rest).resolve())
    return url


def absolute_spec(spec: SearchSpec) -> SearchSpec:
    """The spec with studies/leaderboard/storage paths absolute (the spec hash is unchanged)."""
    update: dict[str, Any] = {"studies_dir": str(Path(spec.studies_dir).resolve()),
                              "storage": _absolute_url(spec.storage), "executor": "ray"}
    if spec.leaderboard_dir:
        update["leaderboard_dir"] = str(Path(spec.leaderboard_dir).resolve())
    return spec.model_copy(update=update)


def make_scheduler(spec: SearchSpec):
    """The spec's pruner as a Tune scheduler: ASHA on ``step`` (grace period = eval_every,
    max_t = steps) for median / successive_halving / hyperband, FIFO for none or for a
    two-objective study."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    p, b = spec.pruner, spec.budget
    if p.name == "none" or spec.objective.second is not None:
        return FIFOScheduler()
    max_t = b.steps
    grace = min(max(b.eval_every, p.n_warmup_steps), max_t)
    if p.name == "median":
        rf, brackets = 2, 1  # keep the better half at every rung
    elif p.name == "successive_halving":
        rf, brackets = 4, 1  # Optuna's SuccessiveHalvingPruner default
    else:  # hyperband: Optuna's default reduction factor, all brackets that fit
        rf = 3
        brackets = 1 + int(math.floor(math.log(max(max_t / grace, 1.0)) / math.log(rf) + 1e-9))
    return _baselines_never_stopped(ASHAScheduler)(time_attr=TIME_ATTR, metric=METRIC, mode="min", max_t=max_t,
                                                   grace_period=grace, reduction_factor=rf, brackets=brackets)


def _baselines_never_stopped(scheduler_cls):
    """The scheduler, except that a baseline trial (``mdm_baseline`` in its config) is never
    stopped: its results still enter the rungs (the yardstick for the other trials), but it
    runs to the full budget, as with the local executor.  Only the public TrialScheduler
    hook ``on_trial_result`` is overridden."""
    from ray.tune.schedulers import TrialScheduler

    class BaselinesComplete(scheduler_cls):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if (trial.config or {}).get("mdm_baseline"):
                return TrialScheduler.CONTINUE
            return action

    return BaselinesComplete


def _metrics(spec: SearchSpec):
    if spec.objective.second is None:
        return METRIC, "min"
    return [METRIC, spec.objective.second], ["min", "min"]


# ---------------------------------------------------------------------- driver side
class DefineByRun:
    """OptunaSearch's space: the local executor's define-by-run function, plus the ids the
    Tune trial needs to re-attach to its Optuna trial.  (A class: OptunaSearch pickles it.)"""

    def __init__(self, spec: SearchSpec):
        self.spec_json = spec.model_dump_json()
        self._spec: Optional[SearchSpec] = None

    def __getstate__(self):
        return {"spec_json": self.spec_json, "_spec": None}

    def __call__(self, trial) -> dict:
        if self._spec is None:
            self._spec = SearchSpec.model_validate_json(self.spec_json)
        baseline = trial.user_attrs.get("baseline")
        suggest_plan(trial, self._spec, baseline=baseline)
        return {"mdm_trial_id": adapters.trial_id(trial), "mdm_number": int(trial.number),
                "mdm_baseline": baseline or ""}


if _HAVE_RAY:

    class StudySearch(OptunaSearch):
        """OptunaSearch on the study's own storage that stops asking once the study has
        ``n_trials`` finished (+ running) trials, claims each asked trial like the local
        workers do, and leaves reporting and telling to the trials themselves."""

        def __init__(self, spec: SearchSpec, **kwargs):
            self._mdm_spec_json = spec.model_dump_json()
            self._mdm_n_trials = spec.n_trials
            super().__init__(**kwargs)

        def suggest(self, trial_id: str) -> Optional[dict]:
            asked = adapters.searcher_trials(self)
            if trial_id in asked:
                return adapters.searcher_config(self, asked[trial_id])
            spec = SearchSpec.model_validate_json(self._mdm_spec_json)
            if not hasattr(self, "_mdm_space_size"):
                self._mdm_space_size = finite_size(spec)
            with study_lock(spec):
                study = adapters.searcher_study(self)
                counts = count_trials(study)
                target = spec.model_copy(update={"n_trials": _TARGETS.get(spec.study, self._mdm_n_trials)})
                reason = stop_reason(study, target, counts, self._mdm_space_size)
                if reason is not None:
                    log.info("no new trials: %s", reason)
                    return Searcher.FINISHED
                if _past_deadline(spec.study):  # like the local workers: running trials finish
                    log.info("time budget of %.0fs used up: no new trials", spec.time_budget_s or 0)
                    return Searcher.FINISHED
                # claimed by the driver until the trial starts
                ot_trial = claim(study, spec, **{DRIVER_ATTR: _driver_id()})
            asked[trial_id] = ot_trial
            return adapters.searcher_config(self, ot_trial)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """Deliberately not forwarded to Optuna (OptunaSearch would report here): the trial
            reports its own intermediate values at the real training step."""

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            # the trial told the study itself; a trial that errored without telling (its worker
            # died) stays RUNNING so that re-running the command resumes it from its checkpoint
            adapters.searcher_completed(self, trial_id)

    class StudyCallback(Callback):
        """Marks trials stopped by the scheduler (before Tune stops their actor) and logs outcomes."""

        def __init__(self, url: str):
            self.url = url
            self._storage = None

        def __getstate__(self):
            return {"url": self.url, "_storage": None}

        def _store(self):
            if self._storage is None:
                self._storage = make_storage(self.url)
            return self._storage

        def on_trial_result(self, iteration, trials, trial, result, **info):
            trial_id = trial.config.get("mdm_trial_id")
            if trial_id is None:
                return
            if result.get("mdm_final"):
                bpd = result.get(METRIC)
                log.info("trial %s %s%s", trial.config.get("mdm_number"), result.get("mdm_state"),
                         f" val_bpd={bpd:.4f}" if isinstance(bpd, float) and math.isfinite(bpd) else "")
            elif result.get("done"):
                # the scheduler (or a stopper) decided STOP: say so before the actor is stopped
                self._store().set_trial_user_attr(int(trial_id), STOP_ATTR, int(result.get(TIME_ATTR, -1)))


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _latest_experiment(ray_dir: Path) -> tuple[int, Optional[Path]]:
    best, path = 0, None
    if ray_dir.is_dir():
        for p in ray_dir.iterdir():
            if p.is_dir() and p.name.startswith(EXPERIMENT_PREFIX) and p.name[len(EXPERIMENT_PREFIX):].isdigit():
                k = int(p.name[len(EXPERIMENT_PREFIX):])
                if k > best:
                    best, path = k, p
    return best, path


def _resumable_trial_ids(path: Path) -> set[int]:
    """Optuna trial ids of the experiment's trials that Tune will resume (not TERMINATED)."""
    from ray.tune import ExperimentAnalysis

    ids = set()
    try:
        analysis = ExperimentAnalysis(str(path))
        for t in analysis.trials:
            if t.status != "TERMINATED" and t.config.get("mdm_trial_id") is not None:
                ids.add(int(t.config["mdm_trial_id"]))
    except Exception as exc:  # noqa: BLE001 - a half-written experiment: nothing to keep
        log.warning("could not read the trials of %s: %s", path, exc)
    return ids


def _driver_id() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _owner_gone(t: optuna.trial.FrozenTrial) -> bool:
    """Nobody runs this RUNNING trial any more: the Ray driver that asked it is dead (its
    actors died with it), or, for other owners, its heartbeat is stale."""
    d = t.user_attrs.get(DRIVER_ATTR)
    if isinstance(d, dict) and d.get("host") == socket.gethostname():
        return d.get("pid") != os.getpid() and not pid_alive(int(d.get("pid", 0)))
    return is_stale(t)


def _settle(spec: SearchSpec, study: optuna.Study, trial_id: int, number: int) -> Optional[str]:
    """Tell the study the outcome of a trial whose row was written (FINAL set) by a worker
    that died before telling.  Returns the state told, None if there was no row."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    path = row_path(spec, number)
    if not path.exists():
        return None
    try:
        row = pq.read_table(path).to_pylist()[0]
    except (pa.ArrowException, OSError, IndexError) as exc:  # damaged at rest: retried like a missing row
        log.warning("trial %d: unreadable leaderboard row %s (%s); the trial is retried", number, path, exc)
        return None
    state = row["state"]
    values = None
    if row.get(METRIC) is not None:
        values = [row[METRIC]]
        if spec.objective.second is not None:
            values.append(float(row.get(spec.objective.second) or math.nan))
    try:
        tell(study, number, state, values)
    except (RuntimeError, ValueError) as exc:  # told meanwhile
        log.debug("trial %d: %s", number, exc)
    return state


def _retry(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    retry_trial(study, t, "its Ray driver died; retried from its checkpoint")


def _claim_and_recover(spec: SearchSpec, study: optuna.Study, keep: set[int]) -> list[int]:
    """Before (re)starting an experiment: trials whose row was written but whose worker died
    before telling are told from their row; trials the restored experiment resumes are
    claimed by this driver; every other RUNNING trial of a dead driver (asked after its last
    experiment checkpoint) and every stale one (e.g. of a dead local worker) is failed and
    re-queued to resume from its checkpoint, as the local executor does."""
    retried = []
    with study_lock(spec):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            resumed = adapters.trial_id(t) in keep
            if not (resumed or _owner_gone(t)):
                continue  # someone is running it
            if t.user_attrs.get(FINAL_ATTR) and _settle(spec, study, adapters.trial_id(t), t.number):
                continue
            if resumed:
                adapters.set_trial_attr(study, adapters.trial_id(t), DRIVER_ATTR, _driver_id())
                Heartbeat(artifact_dir(spec, t), t.number).beat()
            elif isinstance(t.user_attrs.get(DRIVER_ATTR), dict):
                log.warning("trial %d was left RUNNING by a dead Ray driver: re-queued to resume from its "
                            "checkpoint", t.number)
                _retry(study, t)
                retried.append(t.number)
        retried += recover_stale(study)
    return retried


def trial_dirname(trial) -> str:
    """Tune's directory for a trial: the Optuna trial number it runs."""
    return f"trial-{trial.config.get('mdm_number', 'x')}-{trial.trial_id}"


def _trainable(spec: SearchSpec):
    from ray import tune

    res = dict(spec.resources)
    res.setdefault("cpu", 1)
    res.setdefault("gpu", 0)
    return tune.with_resources(MDMTrial, res)


def _build_tuner(spec: SearchSpec, name: str, trainable):
    from ray import tune

    url = storage_url(spec)
    metric, mode = _metrics(spec)
    searcher = StudySearch(spec, space=DefineByRun(spec), metric=metric, mode=mode,
                                 sampler=make_sampler(spec), study_name=spec.study, storage=make_storage(url))
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(spec), num_samples=-1,
                                  max_concurrent_trials=spec.workers, reuse_actors=True,
                                  trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(
        name=name, storage_path=str(spec.study_dir / "ray"), verbose=0, callbacks=[StudyCallback(url)],
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=True),  # like the local executor
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return tune.Tuner(trainable, param_space=_param_space(spec), tune_config=tune_config, run_config=run_config)


def _param_space(spec: SearchSpec) -> dict:
    """Constants merged into every trial's config (the suggestions come from OptunaSearch)."""
    return {"mdm_spec": spec.model_dump_json(), "mdm_cwd": os.getcwd()}


def _fit(spec: SearchSpec, study: optuna.Study, trainable) -> None:
    """Run (or finish) experiments until the study has its trials; one experiment per round."""
    from ray import tune

    ray_dir = spec.study_dir / "ray"
    size = finite_size(spec)
    for _ in range(MAX_ROUNDS):
        before = count_trials(study)
        if _done(study, spec, size) or _past_deadline(spec.study):
            return
        k, path = _latest_experiment(ray_dir)
        tuner, keep = None, set()
        created = str(study.user_attrs.get("created_at", ""))
        if (path is not None and not (path / DONE_MARKER).exists() and tune.Tuner.can_restore(str(path))
                and _read(path / STUDY_MARKER) == created):
            try:
                keep = _resumable_trial_ids(path)
                tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True, param_space=_param_space(spec))
                log.info("restored the Tune experiment %s (%d trial(s) to resume)", path, len(keep))
            except Exception as exc:  # noqa: BLE001 - unreadable experiment: start a new one
                log.warning("could not restore %s (%s); starting a new experiment", path, exc)
                tuner, keep = None, set()
        restored = tuner is not None
        if tuner is None:
            path = ray_dir / f"{EXPERIMENT_PREFIX}{k + 1}"
            path.mkdir(parents=True, exist_ok=True)
            (path / STUDY_MARKER).write_text(created)
            tuner = _build_tuner(spec, path.name, trainable)
        retried = _claim_and_recover(spec, study, keep)
        if retried:
            log.warning("re-queued trial(s) %s left RUNNING by a dead driver or worker", retried)
        results = tuner.fit()
        errors = list(results.errors)
        if errors:  # fail_fast stopped the experiment; it is not marked done: a re-run restores it
            raise MDMError(f"a Ray trial raised an error ({_last_line(errors[0])}); its log is under {path}; "
                           "re-run the same command to continue")
        (path / DONE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        after = count_trials(study)
        if _done(study, spec, size) or _past_deadline(spec.study):
            return
        if after["decided"] <= before["decided"] and not restored:  # (a restored one may have been done)
            if budget_used(after) >= spec.n_trials:
                return  # the rest is running elsewhere (another driver or local workers)
            raise MDMError(f"the Ray experiment {path} made no progress; see the trial logs under it")
    raise MDMError(f"gave up after {MAX_ROUNDS} Ray experiments without reaching {spec.n_trials} trials")


def _done(study: optuna.Study, spec: SearchSpec, size: Optional[int]) -> bool:
    """Whether the study has its ``n_trials`` (duplicates not counted) or has tried every
    configuration of a finite space."""
    counts = count_trials(study)
    return counts["decided"] - counts["duplicates"] >= spec.n_trials or bool(size and tried_configs(study) >= size)


def run_ray(spec: SearchSpec, address: Optional[str] = None, allow_spec_change: bool = False, *,
            num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> dict:
    """Run the study with Ray Tune (a local Ray instance, or the cluster at ``address``);
    returns the final counts like :func:`run_local`."""
    ray = _import_ray()
    t0 = time.perf_counter()
    # forced experiment snapshots after each trial checkpoint are what makes resume exact
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    spec = absolute_spec(spec)
    study = open_study(spec, allow_spec_change=allow_spec_change)
    record_run(study, spec, "ray")  # the same attributes as a local run (status, ETA)
    counts = count_trials(study)
    _TARGETS[spec.study] = spec.n_trials
    _DEADLINES[spec.study] = Deadline(spec.time_budget_s)
    if not _done(study, spec, finite_size(spec)):
        started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                         logging_level=logging.WARNING)
            started = True
        try:
            _fit(spec, study, _trainable(spec))
        finally:
            if started:
                ray.shutdown()
        counts = count_trials(study)
    counts["wall_seconds"] = time.perf_counter() - t0
    return counts


# ---------------------------------------------------------------------- trial side
class _TuneReporter:
    """``report(step, metrics)`` for :func:`execute_trial`: Optuna intermediate value, a
    snapshot of the checkpoint, ``tune.report``; a stop by the scheduler becomes TrialPruned."""

    def __init__(self, trial: optuna.Trial, spec: SearchSpec, art_dir: Path):
        self.trial = trial
        self.spec = spec
        self.art_dir = art_dir
        self.single = spec.objective.second is None
        self.stopped = False

    def _snapshot(self, step: int):
        from ray import tune

        from ..training.checkpoint import atomic_write_json

        src = self.art_dir / CHECKPOINT
        d = self.art_dir / TUNE_CHECKPOINT_DIR
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{CHECKPOINT}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # the trainer replaces checkpoint.pt atomically: a link is a snapshot
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, d / CHECKPOINT)
        atomic_write_json(d / "meta.json", {"step": int(step), "trial": self.trial.number})
        return tune.Checkpoint.from_directory(str(d))

    def __call__(self, step: int, metrics: dict) -> None:
        from ray import tune

        if self.single:
            self.trial.report(float(metrics[METRIC]), step)
        if step >= self.spec.budget.steps:
            return  # the final result is reported after the final evaluation
        result = {METRIC: float(metrics[METRIC]), TIME_ATTR: int(step), "trial": self.trial.number,
                  "train_loss": metrics.get("train_loss"), "mdm_final": False}
        if not self.single:
            result[self.spec.objective.second] = float(metrics.get(self.spec.objective.second, math.nan))
        checkpoint = self._snapshot(step)
        _IN_REPORT.set()
        try:
            tune.report(result, checkpoint=checkpoint)
        except SystemExit:
            self.stopped = True
            marked = adapters.trial_attrs(self.trial.study, adapters.trial_id(self.trial)).get(STOP_ATTR)
            if marked is not None and int(marked) == int(step):
                raise optuna.TrialPruned(f"stopped by the Tune scheduler at step {step}") from None
            raise _Interrupted() from None
        finally:
            _IN_REPORT.clear()


def _restore_tune_checkpoint(art_dir: Path) -> None:
    """When Tune restores a trial, its last reported checkpoint seeds the artifact dir unless
    the artifact dir already holds a checkpoint at least as far along."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        src = Path(d) / CHECKPOINT
        if not src.exists():
            return
        dst = art_dir / CHECKPOINT
        tune_step, local_step = checkpoint_step(src), checkpoint_step(dst)  # None: missing or unreadable
        if tune_step is None or (local_step is not None and local_step >= tune_step):
            return
        art_dir.mkdir(parents=True, exist_ok=True)
        tmp = art_dir / f".{CHECKPOINT}.from-tune"
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        log.info("restored %s from the Tune checkpoint", dst)


def _tell(study: optuna.Study, trial, outcome) -> None:
    from .runner import tell_outcome

    try:
        tell_outcome(study, trial, outcome)
    except (RuntimeError, ValueError) as exc:  # finished meanwhile (e.g. failed by a recovery)
        log.warning("trial %d: could not tell the study: %s", trial.number, exc)


def _final_result(spec: SearchSpec, number: int, state: str, values, steps) -> dict:
    ok = values is not None and len(values) > 0 and values[0] is not None
    result = {METRIC: float(values[0]) if ok else math.nan,
              TIME_ATTR: int(steps) if ok and steps is not None else 0,
              "trial": number, "mdm_final": True, "mdm_state": state}
    if spec.objective.second is not None:
        result[spec.objective.second] = float(values[1]) if ok and len(values) > 1 else math.nan
    return result


def _trial_main(config: dict) -> None:
    """One Tune trial = one Optuna trial, run by :func:`execute_trial`."""
    import torch
    from ray import tune

    from .runner import execute_trial

    cwd = config.get("mdm_cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative data paths in the spec mean what they meant for the driver
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a reused actor finishes the previous (stopped) trial's thread before the next one:
    # give it time to write its PRUNED row and tell the study
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    spec = SearchSpec.model_validate_json(config["mdm_spec"])
    torch.set_num_threads(spec.budget.threads)
    storage = make_storage(storage_url(spec))
    study = optuna.load_study(study_name=spec.study, storage=storage, sampler=optuna.samplers.RandomSampler(),
                              pruner=optuna.pruners.NopPruner())
    trial_id = int(config["mdm_trial_id"])
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():  # e.g. Tune restored a trial that had finished before the driver died
        tune.report(_final_result(spec, frozen.number, frozen.state.name, frozen.values,
                                  frozen.user_attrs.get("steps", spec.budget.steps)))
        return
    if frozen.user_attrs.get(FINAL_ATTR):  # its row was written, then the worker died before telling
        state = _settle(spec, study, trial_id, frozen.number)
        if state is not None:
            frozen = storage.get_trial(trial_id)
            tune.report(_final_result(spec, frozen.number, state, frozen.values,
                                      frozen.user_attrs.get("steps", spec.budget.steps)))
            return
    trial = adapters.reopen_trial(study, trial_id)
    art_dir = artifact_dir(spec, frozen)
    _restore_tune_checkpoint(art_dir)
    reporter = _TuneReporter(trial, spec, art_dir)
    try:
        outcome = execute_trial(trial, spec, executor="ray", study=study, report=reporter)
    except _Interrupted:
        raise SystemExit(0) from None  # left RUNNING: the restored experiment resumes it
    except Exception:
        try:
            study.tell(trial, state=TrialState.FAIL)  # an unexpected bug: not counted, not retried
        except (RuntimeError, ValueError):
            pass
        raise
    _tell(study, trial, outcome)
    if reporter.stopped:
        raise SystemExit(0)  # Tune is stopping this trial: no more reports
    tune.report(_final_result(spec, frozen.number, outcome.state, outcome.values, outcome.row.get("steps")))


if _HAVE_RAY:

    class MDMTrial(adapters.function_trainable(_trial_main, name="mdmsearch_trial")):
        """The function trainable, with a cleanup that waits for the trial thread to write
        its PRUNED row when Tune stops it (Tune's own cleanup does not wait)."""

        def cleanup(self):
            thread = adapters.training_thread()
            waiting = _IN_REPORT.is_set()
            try:
                super().cleanup()
            finally:
                if waiting and thread is not None and thread.is_alive():
                    thread.join(timeout=60)
