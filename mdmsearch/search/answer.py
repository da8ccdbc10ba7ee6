"""One answer: a study's winner, said the same way by every command.

``run`` (its last line), ``status``, ``STUDY/best`` (``--from-trial``, ``compare``), the
leaderboard and the report all take the winner from :func:`winner` and word its margin with
:func:`margin_text`:

* **With an ended confirmation**, the winner is the configuration the confirmation chose (the
  incumbent, or a challenger decided better than it on fresh seeds).  Its margin is the
  selection-free one: winner minus baseline on the fresh seeds only, test split, with the 95%
  confidence interval and the verdict.  ``STUDY/best`` is the winner's fresh-seed trial with the
  lowest validation BPD (the seed is named).
* **Without one** (the search is running, or confirmation is off), the winner is the best
  *searched* configuration by mean validation BPD over its seeds: never a baseline, never a
  confirmation trial, never one lucky seed of a configuration whose other seeds did worse.
  ``STUDY/best`` is that configuration's trial with the lowest validation BPD.

``STUDY/N`` stays exact (any trial, baselines and confirmation trials included).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from .confirm import confirmed_line, group_of
from .record import StudyKey, TrialRecord, records, study_get
from .spec import SearchSpec

log = logging.getLogger(__name__)

CONFIRMED = "confirmation"  # Winner.source: chosen by the confirmation on fresh seeds
SEARCHED = "search"  # ... by the search alone (mean validation BPD over the search's seeds)


@dataclass(frozen=True)
class Winner:
    """The study's winner and the trial ``STUDY/best`` names."""

    source: str  # CONFIRMED | SEARCHED
    group: str  # configuration up to the seed (leaderboard ``config_group``)
    label: str  # leaderboard.config_label
    trial: int  # the trial STUDY/best resolves to
    seed: int  # that trial's training seed
    seeds: list  # the seeds behind ``val_bpd`` (fresh seeds for a confirmed winner)
    val_bpd: float  # mean validation BPD over ``seeds``
    margin: Optional[dict] = None  # confirmed: the selection-free comparison with the baseline (as_dict)
    baseline: Optional[str] = None  # confirmed: the baseline's label

    @property
    def why(self) -> str:
        """Which trial ``STUDY/best`` takes, in words."""
        n, s = len(self.seeds), "s" if len(self.seeds) != 1 else ""
        if self.source == CONFIRMED:
            return f"fresh seed {self.seed}: the lowest validation BPD of its {n} fresh seed{s} in the confirmation"
        return (f"seed {self.seed}: the lowest validation BPD of its {n} search seed{s}; the configuration is the "
                f"best by mean validation BPD over them")

    def as_dict(self) -> dict:
        return {**asdict(self), "why": self.why}


def study_spec(study: optuna.Study) -> Optional[SearchSpec]:
    """The spec stored in the study (None for a study not made by ``mdmsearch run``)."""
    stored = study_get(study, StudyKey.SPEC)
    if not stored:
        return None
    try:
        return SearchSpec.model_validate(stored)
    except ValidationError as exc:  # a study written by another version: labels fall back to params
        log.warning("study %s: its stored spec does not validate (%s)", study.study_name, str(exc).splitlines()[0])
        return None


def _group(spec: Optional[SearchSpec], t: TrialRecord) -> str:
    """The trial's configuration group: recorded on it, else recomputed from the spec, else (a
    trial whose parameters no longer make a plan) its parameters without the seed."""
    if t.config_group:
        return t.config_group
    if spec is not None:
        try:
            return group_of(spec, t)
        except (ValueError, KeyError) as exc:  # Optuna's FixedTrial: a parameter the spec asks is missing
            log.debug("trial %d: no plan from its parameters (%s)", t.number, exc)
    return repr((t.baseline, sorted((k, v) for k, v in t.params.items() if k != "seed")))


def _label(spec: Optional[SearchSpec], t: TrialRecord) -> str:
    from .confirm import _plan_of

    if spec is not None:
        try:
            return _plan_of(spec, t).label()
        except (ValueError, KeyError) as exc:
            log.debug("trial %d: no plan from its parameters (%s)", t.number, exc)
    return t.baseline.upper() if t.baseline else f"learned {dict(t.params)}"


def _trained(study: optuna.Study, confirmation: bool) -> list[TrialRecord]:
    return [t for t in records(study, states=(TrialState.COMPLETE,))
            if t.trained and t.values and bool(t.confirm) == confirmation]


def _pick(trials: list[TrialRecord]) -> TrialRecord:
    """The trial with the lowest validation BPD (the earliest on a tie)."""
    return min(trials, key=lambda t: (t.values[0], t.number))


def _mean(trials: list[TrialRecord]) -> float:
    return math.fsum(t.values[0] for t in trials) / len(trials)


def _best_group(study: optuna.Study, spec: Optional[SearchSpec], baselines: bool) -> Optional[Winner]:
    """The search's configuration (baselines or searched ones; no confirmation trial) with the
    lowest mean validation BPD over its seeds, and its best seed's trial."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in _trained(study, confirmation=False):
        if bool(t.baseline) == baselines:
            groups.setdefault(_group(spec, t), []).append(t)
    if not groups:
        return None
    group, trials = min(groups.items(), key=lambda kv: (_mean(kv[1]), -len(kv[1]), kv[0]))
    best = _pick(trials)
    return Winner(SEARCHED, group, _label(spec, best), best.number, _seed(best, spec),
                  sorted({_seed(t, spec) for t in trials}), _mean(trials))


def best_searched(study: optuna.Study, spec: Optional[SearchSpec] = None) -> Optional[Winner]:
    """The searched configuration (no baseline, no confirmation trial) with the lowest mean
    validation BPD over its seeds; None before one has completed."""
    return _best_group(study, spec or study_spec(study), baselines=False)


def _seed(t: TrialRecord, spec: Optional[SearchSpec] = None) -> int:
    """A trial's training seed: a fresh one, the searched one, else the spec's only seed."""
    if t.confirm:
        return int(t.confirm.seed)
    if "seed" in t.params or spec is None:
        return int(t.params.get("seed", 0))
    return int(spec.seeds[0])


def _fresh(study: optuna.Study, spec: Optional[SearchSpec], group: str, info: dict) -> Optional[Winner]:
    """A raced configuration with its fresh seeds (those behind the confirmation's margin, when it
    names them): its best fresh trial, their mean."""
    keep = set(info.get("fresh_seeds") or [])
    fresh = [t for t in _trained(study, confirmation=True)
             if t.confirm.group == group and (not keep or t.confirm.seed in keep)]
    if not fresh:  # (its fresh-seed trials were removed from the storage)
        return None
    best = _pick(fresh)
    return Winner(CONFIRMED, group, _label(spec, best), best.number, _seed(best), sorted({_seed(t) for t in fresh}),
                  _mean(fresh), margin=info.get("vs_baseline"), baseline=(info.get("baseline") or {}).get("label"))


def confirmed(study: optuna.Study, spec: Optional[SearchSpec] = None) -> Optional[Winner]:
    """The winner of an ended confirmation (None without one, or one that chose nothing)."""
    info = study_get(study, StudyKey.CONFIRMATION) or {}
    if not info.get("winner"):
        return None
    found = _fresh(study, spec or study_spec(study), info["winner"]["group"], info)
    # the label the confirmation stored: every view prints the same line (confirm.headline)
    return replace(found, label=info["winner"]["label"]) if found else None


def reference_baseline(study: optuna.Study, spec: Optional[SearchSpec] = None) -> Optional[Winner]:
    """The baseline the winner is measured against (``STUDY/baseline``): the confirmation's, with
    its fresh seeds, else the best baseline configuration of the search."""
    spec = spec or study_spec(study)
    info = study_get(study, StudyKey.CONFIRMATION) or {}
    if info.get("winner"):
        found = _fresh(study, spec, info["baseline"]["group"], {"fresh_seeds": info.get("fresh_seeds")})
        if found is not None:
            return found
    return _best_group(study, spec, baselines=True)


def winner(study: optuna.Study, spec: Optional[SearchSpec] = None) -> Optional[Winner]:
    """The confirmed winner, else the best searched configuration."""
    return confirmed(study, spec) or best_searched(study, spec)


def winner_line(w: Optional[Winner]) -> str:
    """The one line every command leads with."""
    if w is None:
        return "winner: none yet (no searched configuration has completed)"
    if w.source == CONFIRMED:
        return confirmed_line(w.label, w.margin, w.seeds, w.baseline)
    n = len(w.seeds)
    return (f"winner (search only, not confirmed): {w.label}: mean validation BPD {w.val_bpd:.4f} over "
            f"{n} seed{'s' if n != 1 else ''} (the seeds that selected it)")


__all__ = ["CONFIRMED", "SEARCHED", "Winner", "best_searched", "confirmed", "reference_baseline", "study_spec", "winner",
           "winner_line"]
