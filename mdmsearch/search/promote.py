"""Promote a searched configuration: the run config of a study's trial (or its best one), to
train again at full budget with `mdmsearch train --from-trial STUDY/N --steps 20000 --out DIR`.

Search runs at small fidelity; the chosen trial's saved ``config.yaml`` (written by the
trainer into the trial's artifact directory) is the exact configuration it trained, so the
promoted run differs only in what the command line overrides (steps, seed, device, ...).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .answer import reference_baseline, winner
from .record import Outcome, records

log = logging.getLogger(__name__)

BEST, BASELINE = "best", "baseline"  # the named trials of a study (mdmsearch.search.answer)
_REF = re.compile(rf"^(?P<study>[A-Za-z0-9_.-]+)/(?P<trial>\d+|{BEST}|{BASELINE})$")


def parse_trial_ref(ref: str, what: str = "--from-trial") -> tuple[str, int | str]:
    """``STUDY/N``, ``STUDY/best`` or ``STUDY/baseline`` -> (study, N or the name); ``what`` starts
    the error."""
    m = _REF.match(ref.strip())
    if m is None:
        raise ConfigError(f"{what} {ref!r}: expected STUDY/N (a trial number), STUDY/best or STUDY/baseline, "
                          f"e.g. aux3/9")
    trial = m.group("trial")
    return m.group("study"), trial if trial in (BEST, BASELINE) else int(trial)


def _open(study_name: str, studies_dir: str | Path, storage: Optional[str], what: str = "--from-trial"):
    import optuna

    from ..preflight import journal_path, normalize_storage
    from .study import make_storage

    url = normalize_storage(storage, Path(studies_dir) / study_name / "journal.log")
    jp = journal_path(url)
    if jp is not None and not jp.is_file():
        raise ConfigError(f"{what}: no study {study_name!r} under {studies_dir}/ (give --studies-dir or --storage)")
    try:
        return optuna.load_study(study_name=study_name, storage=make_storage(url))
    except KeyError:
        raise ConfigError(f"{what}: no study {study_name!r} in {url}") from None


def _named(study, name: str, what: str = "--from-trial"):
    """The trial ``STUDY/best`` or ``STUDY/baseline`` names (:mod:`mdmsearch.search.answer`): the
    winner's (the confirmed winner's best fresh seed, else the best searched configuration's best
    seed), or its reference baseline's."""
    w = winner(study) if name == BEST else reference_baseline(study)
    if w is None:
        what_is = "searched configuration" if name == BEST else "baseline"
        raise ConfigError(f"{what} {study.study_name}/{name}: the study has no completed {what_is} yet")
    return records(study)[w.trial], f"{study.study_name}/{name}: {w.label}; {w.why}"


def resolve_trial(ref: str, studies_dir: str | Path = "studies", storage: Optional[str] = None,
                  what: str = "--from-trial"):
    """The :class:`TrialRecord` that trained the configuration of ``STUDY/N``, ``STUDY/best`` or
    ``STUDY/baseline``: a duplicate answers as the trial it duplicates; one that did not train is a
    ConfigError (one line, starting with ``what``).  Its ``artifact_dir`` holds the run."""
    return resolve_trial_why(ref, studies_dir, storage, what)[0]


def resolve_trial_why(ref: str, studies_dir: str | Path = "studies", storage: Optional[str] = None,
                      what: str = "--from-trial"):
    """:func:`resolve_trial` and, for ``best``/``baseline``, which configuration and seed that is and
    why (None for ``STUDY/N``)."""
    study_name, number = parse_trial_ref(ref, what)
    study = _open(study_name, studies_dir, storage, what)
    why = None
    if isinstance(number, str):
        trial, why = _named(study, number, what)
    else:
        trials = records(study)
        if not 0 <= number < len(trials):
            raise ConfigError(f"{what} {ref}: study {study_name!r} has trials 0..{len(trials) - 1}")
        trial = trials[number]
    if trial.duplicate_of is not None:  # answered from an earlier trial: that one trained this configuration
        trial = records(study)[int(trial.duplicate_of)]
    if trial.outcome in (Outcome.INVALID, Outcome.FAIL) or trial.artifact_dir is None:
        raise ConfigError(f"{what} {ref}: trial {trial.number} did not train ({trial.outcome or trial.state.name}"
                          f"{': ' + str(trial.reason) if trial.reason else ''})")
    return trial, why


def trial_run_config(ref: str, studies_dir: str | Path = "studies", storage: Optional[str] = None) -> tuple[dict, str]:
    """The saved run config (a dict, as in a run-config YAML) of the trial ``ref`` and a
    description of where it came from."""
    import yaml

    trial, why = resolve_trial_why(ref, studies_dir, storage)
    study_name, _ = parse_trial_ref(ref)
    path = Path(trial.artifact_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--from-trial {ref}: {path} is missing (the trial's artifacts were moved or deleted)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"--from-trial {ref}: {path} is not a run config")
    data.setdefault("train", {})["progress"] = True  # trials train silently; a promoted run shows progress
    val = trial.values[0] if trial.values else None
    where = f"trial {trial.number} of study {study_name}" + (f" (val_bpd {val:.4f})" if val is not None else "")
    log.info("training the configuration of %s%s", where, f" ({why})" if why else "")
    return data, where
