"""Optuna study plumbing: storage, samplers/pruners from the spec, spec hashing, liveness,
and recovery of trials whose worker died."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ConfigError
from ..preflight import connect_args
from . import adapters, dimensions
from .baselines import baseline_trials
from .record import (KEYS, Outcome, StudyKey, TrialRecord, enqueue, records, study_get, study_set,  # noqa: F401
                     write_by_id)
from .spec import SearchSpec

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
FINAL_ATTR, OUTCOME_ATTR = KEYS["final"], KEYS["outcome"]  # (the stored keys, for readers of raw studies)
STALE_SECONDS = 60.0


def storage_url(spec: SearchSpec) -> str:
    return spec.storage or f"journal:{spec.study_dir / 'journal.log'}"


def make_storage(url: str):
    """A journal file path (``journal:PATH``) or any Optuna RDB URL.  A journal whose tail was
    torn by a crash is repaired first (see :func:`repair_journal`)."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        lock = JournalFileOpenLock(str(path))
        if path.exists():
            repair_journal(path, lock)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    # bounded connects (a server gone mid-study is an error, not a hang) and a ping before a
    # pooled connection is reused (a restarted server leaves the pool's connections dead)
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args(url), "pool_pre_ping": True})


def _first_bad_line(data: bytes) -> Optional[int]:
    """Byte offset of the first journal line that is torn (no newline) or not JSON, else None."""
    offset = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            return offset
        try:
            json.loads(line)
        except ValueError:
            return offset
        offset += len(line)
    return None


def repair_journal(path: Path, lock) -> Optional[Path]:
    """Cut a journal at its first torn or undecodable line, after backing the whole file up
    (``<journal>.torn-<time>``); returns the backup or None if the file was sound.

    Runs under Optuna's own journal lock, which every writer holds while appending: a torn
    line found then was left by a writer that died mid-write (kill -9, power loss, full disk),
    never by one still writing.  Without the cut, the next append would glue a complete record
    to the torn one and make every later read fail."""
    lock.acquire()
    try:
        data = path.read_bytes()
        bad = _first_bad_line(data)
        if bad is None:
            return None
        backup = path.with_name(f"{path.name}.torn-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        backup.write_bytes(data)
        with open(path, "r+b") as fh:
            fh.truncate(bad)
            fh.flush()
            os.fsync(fh.fileno())
        dropped = data[bad:].count(b"\n") + (0 if data.endswith(b"\n") else 1)
        log.warning("%s: torn or damaged record at byte %d (a crash during a write?): cut off %d line(s); "
                    "the original is kept as %s", path, bad, dropped, backup.name)
        return backup
    finally:
        lock.release()


def make_sampler(spec: SearchSpec, worker: int = 0):
    """The spec's sampler; each worker process gets its own seed (seed + worker), otherwise
    parallel workers would propose identical random start-up trials."""
    s = spec.sampler.model_copy(update={"seed": spec.sampler.seed + worker})
    # the model-based samplers count every finished trial toward their start-up, the enqueued
    # baseline runs too: n_startup_trials counts the searched trials after them
    startup = s.n_startup_trials + len(baseline_trials(spec))
    if s.name == "tpe":
        # with several workers, running trials count as a pessimistic value ("constant liar"), so
        # parallel workers do not all propose the point TPE currently likes best
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup,
                                          multivariate=True, group=True, constant_liar=spec.workers > 1)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=startup)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    if s.name == "grid":
        return AskTellGridSampler(grid_space(spec), seed=s.seed)
    raise ConfigError(f"unknown sampler {s.name!r}")  # pragma: no cover - validated by the spec


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask-and-tell loops: Optuna's version calls ``study.stop()`` once the
    grid is exhausted, which only works inside ``study.optimize``.  Here the worker loop's
    trial count decides when to stop; further trials revisit grid points (and are answered
    as duplicates without training)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_space(spec: SearchSpec) -> dict[str, list]:
    """The grid sampler's space: the choices of every searched dimension (a continuous range
    or a per-entry structure cannot be a grid)."""
    if spec.structure.per_entry:
        raise ConfigError("sampler.name: grid needs named patterns (structure.per_entry: false)")
    space: dict[str, list] = {}
    for dim in dimensions.all_dims():
        choices = dim.choices(spec)
        if choices is None:
            raise ConfigError(f"hyper.{dim.name}: the grid sampler needs a value or choices, not a range")
        if len(choices) > 1:
            space[dim.name] = choices
    return space


def make_pruner(spec: SearchSpec):
    p = spec.pruner
    if spec.objective.second is not None or p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.budget.eval_every)
    return optuna.pruners.HyperbandPruner(min_resource=spec.budget.eval_every, max_resource=spec.budget.steps)


def directions(spec: SearchSpec) -> list[str]:
    return ["minimize"] if spec.objective.second is None else ["minimize", "minimize"]


@contextmanager
def study_lock(spec: SearchSpec):
    """An exclusive lock among the worker processes of this machine (ask/count/recover)."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    with open(spec.study_dir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_study(spec: SearchSpec, *, allow_spec_change: bool = False, create: bool = True,
               worker: int = 0) -> optuna.Study:
    """Create or load the study; refuse to resume a study created with another space."""
    url = storage_url(spec)
    storage = make_storage(url)
    with study_lock(spec):
        try:
            study = optuna.load_study(study_name=spec.study, storage=storage, sampler=make_sampler(spec, worker),
                                      pruner=make_pruner(spec))
            fresh = False
        except KeyError:
            if not create:
                raise ConfigError(f"no study {spec.study!r} in {url}") from None
            study = optuna.create_study(study_name=spec.study, storage=storage, sampler=make_sampler(spec, worker),
                                        pruner=make_pruner(spec), directions=directions(spec))
            fresh = True
        h = spec.spec_hash()
        if study.metric_names is None:  # a dashboard shows "val_bpd", not "Objective 0"
            study.set_metric_names(metric_names(spec))
        if fresh:
            study_set(study, StudyKey.SPEC_HASH, h)
            study_set(study, StudyKey.SPEC, spec.normalized())
            study_set(study, StudyKey.CREATED_AT, datetime.now(timezone.utc).isoformat())
            for name, params in baseline_trials(spec):  # each baseline's grid of hyperparameters, every seed
                enqueue(study, params, baseline=name)
        elif study_get(study, StudyKey.SPEC_HASH) != h:
            if not allow_spec_change:
                raise ConfigError(
                    f"study {spec.study!r} was created with a different search space (spec hash "
                    f"{study_get(study, StudyKey.SPEC_HASH)} != {h}); use a new study name or --allow-spec-change")
            log.warning("resuming study %s with a changed spec (hash %s -> %s)", spec.study,
                        study_get(study, StudyKey.SPEC_HASH), h)
            study_set(study, StudyKey.SPEC_HASH, h)
            study_set(study, StudyKey.SPEC, spec.normalized())
    return study


# ---------------------------------------------------------------------- liveness
def heartbeat_path(artifact_dir: Path) -> Path:
    return Path(artifact_dir) / "heartbeat.json"


def where_running() -> dict:
    """This process: its host and pid, and its Ray node when it is a Ray worker."""
    here = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")  # (never imported here: only a Ray worker has it loaded and initialized)
    if ray is not None and ray.is_initialized():
        here["ray_node"] = ray.get_runtime_context().get_node_id()
    return here


def beats_in_study(study: Optional[optuna.Study]) -> bool:
    """Whether a running trial of ``study`` beats into its own record in the storage.

    With a database (PostgreSQL, MySQL, SQLite) the beat is a trial attribute: a worker on
    another machine tells a dead trial from a live one through the database alone, with no
    shared file system.  With a journal file every worker shares that file's file system
    anyway, and a beat per trial every few seconds would grow the journal; the beat is a file
    next to the trial's artifacts."""
    local = (optuna.storages.JournalStorage, optuna.storages.InMemoryStorage)  # (in-memory: one process, tests)
    return study is not None and not isinstance(adapters.storage_of(study), local)


class Heartbeat:
    """Records {pid, host, time, trial} for a running trial every HEARTBEAT_SECONDS, where
    :func:`beats_in_study` says: in the trial's record, or in ``<artifact_dir>/heartbeat.json``."""

    def __init__(self, artifact_dir: Path, trial_number: int, study: Optional[optuna.Study] = None,
                 trial_id: Optional[int] = None):
        self.path = heartbeat_path(artifact_dir)
        self.trial_number = trial_number
        self._study = study if beats_in_study(study) and trial_id is not None else None
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_number}")

    def beat(self) -> None:
        info = {**where_running(), "time": time.time(), "trial": self.trial_number}
        if self._study is not None:
            write_by_id(self._study, self._trial_id, heartbeat=info)  # RuntimeError once the trial is told
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except RuntimeError:  # told meanwhile (its end raced this beat): nothing left to beat for
                return
            except (OSError, SQLAlchemyError) as exc:  # a full disk or a database blip must not kill
                log.warning("heartbeat write failed: %s", exc)  # training; the next beat retries

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        # a file stays until the trial is told (worker_loop removes it then): a worker killed
        # between the leaderboard write and the tell is detected by its dead pid
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_SECONDS)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class HeldClaims:
    """Heartbeats a Ray driver keeps for the trials it claimed until each one starts.

    A claimed Tune trial can wait PENDING for minutes on a busy cluster.  With only the beat of
    ``claim``, it looked stale after STALE_SECONDS to any other executor of the study (a local
    run, another driver), which failed and re-queued it: trained twice, and the Ray run stopped
    on the tell of a trial failed meanwhile.  The driver beats for it instead, until the trial's
    own worker takes over (``release`` on Tune's trial start) or the driver ends."""

    def __init__(self):
        self._beats: dict[int, Heartbeat] = {}
        self._lock = threading.Lock()

    def hold(self, artifact_dir: Path, trial_number: int, study: Optional[optuna.Study] = None,
             trial_id: Optional[int] = None) -> None:
        beat = Heartbeat(artifact_dir, trial_number, study, trial_id).start()
        with self._lock:
            self._beats[trial_number] = beat

    def release(self, trial_number: int) -> None:
        """Stop beating for one trial (its heartbeat file stays for its worker to take over)."""
        with self._lock:
            beat = self._beats.pop(trial_number, None)
        if beat is not None:
            beat.stop()

    def release_all(self) -> None:
        with self._lock:
            numbers = list(self._beats)
        for number in numbers:
            self.release(number)

    def __contains__(self, trial_number: int) -> bool:
        with self._lock:
            return trial_number in self._beats


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial, now: Optional[float] = None) -> bool:
    """A RUNNING trial whose worker is gone: its pid is dead on this host, or its last beat
    (in its record or its heartbeat file, see :class:`Heartbeat`) is older than STALE_SECONDS.

    A claimed trial (artifact directory set) without any beat was orphaned between the ask and
    the first beat (``lifecycle.claim`` writes both within milliseconds, under the study lock),
    e.g. by a driver killed exactly then: stale once HEARTBEAT_SECONDS have passed since its
    start.  Waiting STALE_SECONDS instead let a resumed run count it as running elsewhere and
    stop one trial short.  An unclaimed trial without a beat: STALE_SECONDS."""
    now = time.time() if now is None else now
    trial = trial if isinstance(trial, TrialRecord) else TrialRecord.of(trial)  # (or an Optuna trial)
    art = trial.artifact_dir
    info = trial.heartbeat or _beat_file(art)
    if info == "torn":
        return False  # being rewritten right now
    if info:
        if info.get("host") == socket.gethostname() and not pid_alive(int(info["pid"])):
            return True
        return now - float(info["time"]) > STALE_SECONDS
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - started > (HEARTBEAT_SECONDS if art else STALE_SECONDS)


def _beat_file(artifact_dir: Optional[str]):
    """The beat in a trial's heartbeat file: a mapping, None without one, "torn" mid-rewrite."""
    hb = heartbeat_path(Path(artifact_dir)) if artifact_dir else None
    if hb is None or not hb.exists():
        return None
    try:
        return json.loads(hb.read_text())
    except (OSError, ValueError):
        return "torn"


def retry_trial(study: optuna.Study, t: TrialRecord, reason: str) -> bool:
    """Fail a RUNNING trial whose worker died and enqueue a retry with the same parameters
    that resumes from its artifact directory's checkpoint.  False if it finished meanwhile."""
    write_by_id(study, t.trial_id, failed_reason=reason)
    try:
        adapters.fail_trial(study, t.trial_id)
    except RuntimeError:  # finished meanwhile by another worker
        return False
    # what the plan reads besides the parameters: a baseline's name, a confirmation's seed
    enqueue(study, t.params, retry_of=t.number, artifact_id=t.artifact_id if t.artifact_id is not None else t.number,
            **({"baseline": t.baseline} if t.baseline else {}), **({"confirm": t.confirm} if t.confirm else {}))
    return True


def count_trials(study: optuna.Study) -> dict[str, int]:
    """finished: decided trials that did not fail; failed: decided FAILs; decided: both;
    duplicates: decided trials answered from an earlier trial's result (no training);
    confirmation: confirmation trials trained or training (the search's budget leaves them out)."""
    trials = records(study)
    decided = [t for t in trials if t.decided]
    failed = sum(1 for t in decided if t.failed)
    duplicates = sum(1 for t in decided if t.duplicate)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    confirming = sum(1 for t in trials if t.confirm and (t.state == TrialState.RUNNING or (t.decided and not t.duplicate)))
    return {"finished": len(decided) - failed, "failed": failed, "decided": len(decided), "duplicates": duplicates,
            "running": running, "waiting": waiting, "confirmation": confirming, "total": len(trials)}


def budget_used(counts: dict[str, int]) -> int:
    """Trials that count toward ``n_trials``: decided ones (failed included, so that a search
    whose trials fail still ends) and running ones, but not duplicates, which cost nothing and
    bring no new information, nor confirmation trials, which come after the search."""
    return counts["decided"] - counts["duplicates"] + counts["running"] - counts.get("confirmation", 0)


MAX_REPEATS = 50  # consecutive answers without training (duplicates, invalid) before a search gives up


def tried_configs(study: optuna.Study) -> int:
    """Distinct searched (non-baseline) configurations the study has decided by training or
    trying to train them (complete, pruned or failed; not invalid, not duplicates)."""
    return len({t.config_hash for t in records(study) if t.decided and not t.baseline and not t.confirm
                and t.outcome in (Outcome.COMPLETE, Outcome.PRUNED, Outcome.FAIL)})


def stop_reason(study: optuna.Study, spec: SearchSpec, counts: dict[str, int], space_size: Optional[int],
                repeats: int = 0) -> Optional[str]:
    """Why no new trial should start, or None: n_trials reached (duplicates not counted), the
    finite space exhausted at this budget, or the sampler only repeating itself; a study that
    only confirms another's winner never searches."""
    confirms = study_get(study, StudyKey.CONFIRM_ONLY)
    if confirms:
        return f"a confirmation of study {confirms['of']}: nothing to search"
    if budget_used(counts) >= spec.n_trials:
        return f"n_trials={spec.n_trials} reached ({counts['duplicates']} duplicate(s) answered without training)"
    # (a space without any valid configuration runs on: its INVALID rows say why)
    if space_size and counts["waiting"] == 0 and tried_configs(study) >= space_size:
        return (f"search space exhausted: all {space_size} distinct configurations have been tried at this budget "
                f"({budget_used(counts)} of n_trials={spec.n_trials} used)")
    if repeats >= MAX_REPEATS:
        return (f"the sampler proposed only already-seen or invalid configurations for {repeats} trials in a row: "
                f"the space looks exhausted at this budget")
    return None


def failure_summary(study: optuna.Study, limit: int = 3, width: int = 160) -> str:
    """One line: the failed trials grouped by reason, e.g. "trials 3, 5: non-finite loss ..."."""
    by_reason: dict[str, list[int]] = {}
    for t in records(study):
        if t.failed:
            reason = str(t.reason or "no reason recorded")
            reason = reason.splitlines()[0] if reason.strip() else "no reason recorded"
            by_reason.setdefault(reason[:width], []).append(t.number)
    parts = [f"trial{'s' if len(n) > 1 else ''} {', '.join(map(str, n))}: {r}"
             for r, n in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:limit]]
    if len(by_reason) > limit:
        parts.append(f"{len(by_reason) - limit} other reason(s)")
    return "; ".join(parts)


def metric_names(spec: SearchSpec) -> list[str]:
    return [spec.objective.metric] + ([spec.objective.second] if spec.objective.second else [])


def record_run(study: optuna.Study, spec: SearchSpec, executor: str) -> None:
    """Study attributes every executor sets (for `mdmsearch status` and dashboards)."""
    study_set(study, StudyKey.N_TRIALS, spec.n_trials)
    study_set(study, StudyKey.WORKERS, spec.workers)
    study_set(study, StudyKey.EXECUTOR, executor)
