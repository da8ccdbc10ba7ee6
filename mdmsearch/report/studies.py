"""Reading the Optuna studies behind a leaderboard (read-only): spec hashes and parameter
importances.  A missing or unreadable study is a note in the report, never an error."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ..search.record import StudyKey, study_get

log = logging.getLogger(__name__)

MIN_COMPLETE_FOR_IMPORTANCE = 4


@dataclass
class StudyInfo:
    name: str
    storage: Optional[str] = None
    study: Any = None  # optuna.Study, or None when it could not be loaded
    spec_hash: Optional[str] = None
    created_at: Optional[str] = None
    note: Optional[str] = None  # why the study is not available
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: Optional[str] = None
    n_complete: int = 0

    def as_dict(self) -> dict:
        return {"storage": self.storage, "spec_hash": self.spec_hash, "created_at": self.created_at,
                "note": self.note}


def load_study(studies_dir: str | Path, name: str, storage: Optional[str] = None) -> StudyInfo:
    """The study ``name`` from ``storage`` (a checked URL, see ``preflight.normalize_storage``),
    else from ``<studies_dir>/<name>/journal.log`` (the default storage of ``mdmsearch run``)."""
    import optuna

    if storage is not None and not storage.startswith("journal:"):
        return _load_from_database(name, storage)
    path = Path(storage[len("journal:"):]) if storage else Path(studies_dir) / name / "journal.log"
    info = StudyInfo(name=name, storage=str(path.resolve()))
    if not path.is_file():
        info.note = f"study {name!r} not found at {path} (pass --studies-dir or --storage)"
        return info
    try:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        # the same lock as the workers (mdmsearch.search.study.make_storage); reading never takes
        # it, and make_storage is not used because it would create missing directories
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))
    except KeyError:
        info.note = f"no study named {name!r} in {path}"
        return info
    except Exception as exc:  # a corrupt or foreign journal must not stop the report
        log.warning("cannot read study %s from %s: %s", name, path, exc)
        info.note = f"cannot read study {name!r} from {path}: {type(exc).__name__}: {exc}"
        return info
    return _with_study(info, study)


def _load_from_database(name: str, url: str) -> StudyInfo:
    import optuna

    from ..preflight import _redact
    from ..search.study import make_storage

    info = StudyInfo(name=name, storage=_redact(url))
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url))
    except KeyError:
        info.note = f"no study named {name!r} in {info.storage}"
        return info
    return _with_study(info, study)


def _with_study(info: StudyInfo, study) -> StudyInfo:
    info.study = study
    info.spec_hash = study_get(study, StudyKey.SPEC_HASH)
    created = study_get(study, StudyKey.CREATED_AT)
    try:
        info.created_at = datetime.fromisoformat(created).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        info.created_at = created
    return info


def compute_importances(info: StudyInfo) -> StudyInfo:
    """Optuna's ``get_param_importances`` on the study's completed trials (first objective)."""
    import optuna
    from optuna.trial import TrialState

    if info.study is None:
        info.importance_note = info.note or f"study {info.name!r} is not available"
        return info
    study = info.study
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    info.n_complete = len(trials)
    params = {k for t in trials for k in t.params}
    varying = {k for k in params if len({repr(t.params.get(k)) for t in trials}) > 1}
    if len(trials) < MIN_COMPLETE_FOR_IMPORTANCE:
        info.importance_note = (f"study {info.name!r}: too few complete trials for parameter importances "
                                f"({len(trials)} < {MIN_COMPLETE_FOR_IMPORTANCE})")
        return info
    if len(varying) < 2:
        which = f" ({', '.join(sorted(varying))})" if varying else ""
        info.importance_note = (f"study {info.name!r}: importances need at least two parameters that vary "
                                f"among complete trials, found {len(varying)}{which}")
        return info
    try:
        with warnings.catch_warnings():  # PedAnova's "low target values" reminder; we minimize BPD
            warnings.simplefilter("ignore", UserWarning)
            imp = optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
    except Exception as exc:  # e.g. a degenerate study: report it, keep going
        log.warning("parameter importances for study %s failed: %s", info.name, exc)
        info.importance_note = f"study {info.name!r}: parameter importances failed ({type(exc).__name__}: {exc})"
        return info
    info.importances = {str(k): float(v) for k, v in imp.items()}
    if not info.importances:
        info.importance_note = f"study {info.name!r}: Optuna returned no importances"
    return info
