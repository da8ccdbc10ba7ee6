"""The Ray Tune executor: ``mdmsearch run SPEC --executor ray [--address ADDR]``.

Ray only decides *where* a trial runs; what it does is the local executor's life cycle
(:mod:`mdmsearch.search.lifecycle`), through public APIs only:

* the driver's :class:`StudySearcher` (a plain ``ray.tune.search.Searcher``) claims each
  trial from the study with Optuna's public ask, under the same stop rule (``n_trials``
  without duplicates, an exhausted finite space) and time budget as the local workers;
* each Tune trial is the plain function :func:`_trial_main`: it opens the study with the
  spec's sampler and pruner and runs :func:`~mdmsearch.search.runner.run_claimed`, so the
  parameters, the pruning (baselines never pruned), the leaderboard row and the tell are
  exactly those of a local worker, written by the trial itself: nothing is lost if the
  driver dies;
* every run of the command is one Tune experiment ``studies/<study>/ray/run-<k>``; before it
  starts, trials left RUNNING by a dead driver or worker are told from their row or re-queued
  to resume from their checkpoint (:func:`~mdmsearch.search.lifecycle.recover`);
* a trial whose worker or node dies mid-run is restarted by Tune (``FailureConfig.max_failures``)
  with the same Optuna trial: it resumes its checkpoint, or is told from its row if it wrote
  one, exactly as a dead local worker's trial is recovered; an unexpected exception inside a
  trial (a bug) is told FAIL and stops the experiment (:class:`StopOnError`), as it stops a
  local run.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import optuna

from ..errors import MDMError
from . import adapters
from .confirm import Step, next_step
from .confirm import finished as confirm_finished
from .gpus import trial_resources
from .lifecycle import Deadline, artifact_dir, claim, recover, settle
from .space import finite_size
from .spec import SearchSpec
from .record import StudyKey, TrialRecord, study_get
from .study import (HeldClaims, count_trials, make_storage, open_study, record_run, stop_reason, storage_url,
                    study_lock, tried_configs)

log = logging.getLogger(__name__)

RAY_HINT = 'the Ray executor needs Ray: pip install -e ".[ray]"'
EXPERIMENT_PREFIX = "run-"
METRIC = "val_bpd"
ERROR = "mdm_error"  # in a trial's result: the unexpected exception that ended it (see StopOnError)
NODE_RETRIES = 3  # restarts of a trial whose worker or node died (Tune's max_failures)
MAX_ROUNDS = 100
# the driver's beats for claimed trials that have not started (one driver per process; module-level
# because Tune may pickle the searcher, and its trial-start callback must reach the same beats)
HELD = HeldClaims()

try:  # Ray is optional: run_ray() says how to install it
    from ray.tune import Callback, Stopper
    from ray.tune.search import Searcher

    _HAVE_RAY = True
except ImportError:  # pragma: no cover - exercised without Ray installed
    Callback = Searcher = Stopper = object
    _HAVE_RAY = False


class StopOnError(Stopper):
    """Stops the whole experiment once a trial reports an unexpected exception.

    Tune's ``fail_fast`` cannot be used: it stops the experiment on *any* trial failure, also
    one Tune is about to recover (a dead worker or node, restarted with ``max_failures``).  A
    trial therefore never raises a bug to Tune; it reports it under :data:`ERROR`."""

    def __init__(self):
        self.error: Optional[str] = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(ERROR) and self.error is None:
            self.error = str(result[ERROR])
        return bool(result.get(ERROR))

    def stop_all(self) -> bool:
        return self.error is not None


def _import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise MDMError(RAY_HINT) from None
    return ray


def _absolute_url(url: Optional[str]) -> Optional[str]:
    """Relative journal paths and sqlite files, made absolute for workers with another cwd."""
    if url and url.startswith("journal:"):
        return "journal:" + str(Path(url[len("journal:"):]).resolve())
    if url and url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url[10:] not in ("", ":memory:"):
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
    return url


def absolute_spec(spec: SearchSpec) -> SearchSpec:
    """The spec with studies/leaderboard/storage paths absolute (the spec hash is unchanged)."""
    update: dict[str, Any] = {"studies_dir": str(Path(spec.studies_dir).resolve()),
                              "storage": _absolute_url(spec.storage), "executor": "ray"}
    if spec.leaderboard_dir:
        update["leaderboard_dir"] = str(Path(spec.leaderboard_dir).resolve())
    return spec.model_copy(update=update)


# ---------------------------------------------------------------------- driver side
class StudySearcher(Searcher):
    """Claims one trial of the study per Tune trial, until the shared stop rule or the time
    budget says no more; the trial itself reports, is pruned and tells the study."""

    def __init__(self, spec: SearchSpec, space_size: Optional[int], deadline: Deadline):
        super().__init__(metric=METRIC, mode="min")
        self.spec = spec
        self.space_size = space_size
        self.deadline = deadline
        self._study: Optional[optuna.Study] = None

    def __getstate__(self):  # Tune pickles its search algorithm; the study is reopened on demand
        return {**self.__dict__, "_study": None}

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study is the searcher's state."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: the study is the searcher's state."""

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.deadline.passed():  # like the local workers: running trials finish
            log.info("time budget of %.0fs used up: no new trials", self.spec.time_budget_s or 0)
            return Searcher.FINISHED
        if self._study is None:  # parameters are sampled by the trial (spec's sampler): asking here is cheap
            self._study = optuna.load_study(study_name=self.spec.study, storage=make_storage(storage_url(self.spec)),
                                            sampler=optuna.samplers.RandomSampler())
        with study_lock(self.spec):
            reason = stop_reason(self._study, self.spec, count_trials(self._study), self.space_size)
            step = Step.CLAIM if reason is None else next_step(self._study, self.spec)  # the search is done: confirm
            if step is Step.DONE:
                log.info("no new trials: %s", reason)
                return Searcher.FINISHED
            if step is Step.WAIT:  # this confirmation round's last trials are still running: Tune asks again
                return None
            trial = claim(self._study, self.spec)
        # the driver beats until the trial starts
        HELD.hold(artifact_dir(self.spec, trial), trial.number, self._study, adapters.trial_id(trial))
        return {"mdm_number": trial.number, "mdm_trial_id": adapters.trial_id(trial)}

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        """Nothing to do: the trial told the study itself (a trial whose worker died is
        recovered by the next run)."""


class OutcomeLog(Callback):
    """On the driver: one log line per finished trial, as the local workers write; and the end
    of the driver's heartbeat for a claimed trial once Tune starts it (its worker beats from
    then on) or ends it without a start."""

    def on_trial_start(self, iteration, trials, trial, **info):
        _release(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("mdm_outcome"):
            log.info("%s", result["mdm_outcome"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        _release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        _release(trial)


def _release(trial) -> None:
    """The driver stops beating for the Optuna trial a Tune trial runs."""
    HELD.release(int(trial.config["mdm_number"]))


def trial_dirname(trial) -> str:
    """Tune's directory for a trial: the Optuna trial number it runs."""
    return f"trial-{trial.config.get('mdm_number', 'x')}-{trial.trial_id}"


def _next_experiment(ray_dir: Path) -> str:
    runs = [int(p.name[len(EXPERIMENT_PREFIX):]) for p in ray_dir.glob(f"{EXPERIMENT_PREFIX}*")
            if p.name[len(EXPERIMENT_PREFIX):].isdigit()] if ray_dir.is_dir() else []
    return f"{EXPERIMENT_PREFIX}{max(runs, default=0) + 1}"


def _build_tuner(spec: SearchSpec, space_size: Optional[int], deadline: Deadline):
    import ray
    from ray import tune

    # GPUs by budget.device unless the spec sets resources.gpu (search/gpus.py)
    resources = trial_resources(spec, cluster_gpus=float(ray.cluster_resources().get("GPU", 0)))
    tune_config = tune.TuneConfig(search_alg=StudySearcher(spec, space_size, deadline), num_samples=-1,
                                  max_concurrent_trials=spec.workers, reuse_actors=True,
                                  trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=_next_experiment(spec.study_dir / "ray"), storage_path=str(spec.study_dir / "ray"),
                                verbose=0, callbacks=[OutcomeLog()], stop=StopOnError(),
                                failure_config=tune.FailureConfig(max_failures=NODE_RETRIES))
    return tune.Tuner(tune.with_resources(_trial_main, resources), tune_config=tune_config, run_config=run_config,
                      param_space={"mdm_spec": spec.model_dump_json(), "mdm_cwd": os.getcwd()})


def _done(study: optuna.Study, spec: SearchSpec, size: Optional[int]) -> bool:
    """Whether the study has its ``n_trials`` (duplicates not counted) or has tried every
    configuration of a finite space, and has confirmed its winner if the spec asks for it."""
    counts = count_trials(study)
    searched = (counts["decided"] - counts["duplicates"] - counts["confirmation"] >= spec.n_trials
                or bool(study_get(study, StudyKey.CONFIRM_ONLY)))
    return (searched or bool(size and tried_configs(study) >= size)) and confirm_finished(study, spec)


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _raise_trial_errors(results) -> None:
    """A trial's unexpected exception (reported under :data:`ERROR`), or a trial Tune could not
    restart :data:`NODE_RETRIES` times, ends the run with one line, as a worker's error ends a local run."""
    reported = [r.metrics[ERROR] for r in results if r.metrics and r.metrics.get(ERROR)]
    errors = reported + [_last_line(e) for e in results.errors]
    if errors:
        raise MDMError(f"a Ray trial raised an error ({errors[0]}); its log is under {results.experiment_path}; "
                       "re-run the same command to continue")


def _fit(spec: SearchSpec, study: optuna.Study, size: Optional[int], deadline: Deadline) -> None:
    """Tune experiments until the study has its trials: usually one; another only when trials
    counted as running when the searcher stopped asking did not count in the end."""
    for _ in range(MAX_ROUNDS):
        with study_lock(spec):
            recover(study, spec)
        before = count_trials(study)
        if _done(study, spec, size) or deadline.passed():
            return
        results = _build_tuner(spec, size, deadline).fit()
        _raise_trial_errors(results)
        after = count_trials(study)
        if _done(study, spec, size) or deadline.passed():
            return
        if after["decided"] <= before["decided"]:
            if after["running"]:
                return  # the rest is running elsewhere (another driver or local workers)
            raise MDMError(f"the Ray experiment {results.experiment_path} made no progress; see the trial logs under it")
    raise MDMError(f"gave up after {MAX_ROUNDS} Ray experiments without reaching {spec.n_trials} trials")


def run_ray(spec: SearchSpec, address: Optional[str] = None, allow_spec_change: bool = False, *,
            num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> dict:
    """Run the study with Ray Tune (a local Ray instance, or the cluster at ``address``, joined
    before anything is created); returns the final counts like :func:`~mdmsearch.search.runner.run_local`."""
    ray = _import_ray()
    t0 = time.perf_counter()
    spec = absolute_spec(spec)
    started = not ray.is_initialized()
    if started and address:
        connect(ray, address)
    try:
        study = open_study(spec, allow_spec_change=allow_spec_change)
        record_run(study, spec, "ray")  # the same attributes as a local run (status, ETA)
        size = finite_size(spec)
        if not _done(study, spec, size):
            if started and not address:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level=logging.WARNING)
            trial_resources(spec, cluster_gpus=float(ray.cluster_resources().get("GPU", 0)))  # GPUs asked, none: one line
            _fit(spec, study, size, Deadline(spec.time_budget_s))
    finally:
        HELD.release_all()  # trials claimed but never started: recovered by the next run
        if started and ray.is_initialized():
            ray.shutdown()
    counts = count_trials(study)
    counts["wall_seconds"] = time.perf_counter() - t0
    return counts


CONNECT_TIMEOUT_S = 30  # a cluster address that accepts connections but never answers is named after this
PROBE_TIMEOUT_S = 10  # the gRPC handshake a Ray head (GCS, or the Ray client server) answers at once
# HTTP/2 client connection preface + an empty SETTINGS frame (RFC 9113, 3.4 and 6.5): a gRPC server
# answers with its own SETTINGS frame (frame type 0x4) before anything else
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 0x4


def check_address(address: str, what: str = "--address") -> None:
    """A Ray cluster address is ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; a host that
    refuses, is unknown, or accepts but does not answer the gRPC handshake that every Ray head
    answers is one line now, before anything is created and before ``ray.init`` (which would
    retry such an address for ever, and print its own warnings)."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MDMError(f"{what} {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        conn = socket.create_connection((host, int(port)), timeout=5)
    except OSError as exc:
        raise MDMError(f"{what} {address}: cannot reach a Ray cluster there ({exc.strerror or exc})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):  # a TLS head answers no plaintext handshake
            return
        _probe_grpc(conn, address, what)


def _probe_grpc(conn: socket.socket, address: str, what: str) -> None:
    """Send the HTTP/2 preface; a gRPC server's first frame back is SETTINGS."""
    conn.settimeout(PROBE_TIMEOUT_S)
    try:
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 4:
            chunk = conn.recv(4 - len(head))
            if not chunk:
                raise MDMError(f"{what} {address}: not a Ray cluster (the connection was closed without a gRPC answer)")
            head += chunk
    except socket.timeout:
        raise MDMError(f"{what} {address}: no Ray cluster answered within {PROBE_TIMEOUT_S} s "
                       f"(the port accepts connections but says nothing)") from None
    except OSError as exc:
        raise MDMError(f"{what} {address}: cannot reach a Ray cluster there ({exc.strerror or exc})") from None
    if head[3] != _H2_SETTINGS:
        raise MDMError(f"{what} {address}: not a Ray cluster (no gRPC answer)")


def connect(ray, address: str) -> None:
    """Join the cluster at ``address``.  ``ray.init`` cannot be interrupted while it waits for a
    cluster that does not answer; a watchdog ends the process with one line after
    :data:`CONNECT_TIMEOUT_S` (nothing has been created yet, so nothing is lost)."""
    check_address(address)
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(CONNECT_TIMEOUT_S):
            sys.stderr.write(f"mdmsearch: error: --address {address}: no Ray cluster answered within "
                             f"{CONNECT_TIMEOUT_S} s\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True, name="ray-connect-watchdog").start()
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MDMError(f"--address {address}: {_last_line(exc)}") from None
    finally:
        joined.set()


# ---------------------------------------------------------------------- trial side
def _ended_before_start(study: optuna.Study, spec: SearchSpec, number: int, trial_id: int) -> Optional[str]:
    """For a Tune trial restarted after its worker or node died: why it must not run again (its
    Optuna trial was told meanwhile, or its leaderboard row was written before the death and it
    is told from the row now), else None: it runs, resuming its checkpoint."""
    rec = TrialRecord.of(adapters.frozen_trial(study, trial_id))
    if rec.state.is_finished():
        return f"trial {number} had already ended ({rec.shown_state}): not run again"
    told = settle(study, spec, rec)
    return None if told is None else f"trial {number}: told {told} from the row its dead worker wrote"



def _trial_main(config: dict) -> None:
    """One Tune trial = one claimed Optuna trial, run exactly as a local worker runs it."""
    import torch
    from ray import tune

    from .runner import describe_outcome, run_claimed

    if config.get("mdm_cwd") and os.path.isdir(config["mdm_cwd"]):
        os.chdir(config["mdm_cwd"])  # relative data paths in the spec mean what they meant for the driver
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = SearchSpec.model_validate_json(config["mdm_spec"])
    torch.set_num_threads(spec.budget.threads)
    # the spec's sampler and pruner, seeded per trial as local workers are per process
    study = open_study(spec, create=False, worker=int(config["mdm_number"]))
    number, trial_id = int(config["mdm_number"]), int(config["mdm_trial_id"])
    ended = _ended_before_start(study, spec, number, trial_id)
    if ended is not None:
        tune.report({METRIC: math.nan, "trial": number, "mdm_outcome": ended})
        return
    trial = adapters.reopen_trial(study, trial_id)
    try:
        outcome = run_claimed(study, spec, trial, "ray")
    except Exception as exc:  # a bug, told FAIL by run_claimed: StopOnError ends the experiment
        log.exception("trial %d raised an unexpected error", number)
        tune.report({METRIC: math.nan, "trial": number, ERROR: f"{type(exc).__name__}: {exc}"})
        return
    values = outcome.values or [math.nan]
    result = {METRIC: float(values[0]), "trial": trial.number, "mdm_outcome": describe_outcome(outcome)}
    if spec.objective.second is not None:
        result[spec.objective.second] = float(values[1]) if len(values) > 1 else math.nan
    tune.report(result)
