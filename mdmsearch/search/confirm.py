"""Intensification: the search confirms its own winner on fresh seeds.

A search picks the minimum of many noisy numbers; one seed's "better" says nothing about a
structure (docs/comparisons.md).  Once the search has its ``n_trials``, the candidates are
frozen (:func:`select`, stored on the study):

* the **incumbent**: the searched configuration with the lowest mean validation BPD;
* the **baseline**: the best baseline configuration;
* the **challengers**: the next ``confirm.top_k - 1`` searched configurations.

Then rounds: round r trains every candidate still racing on the fresh seed
``seed_start + r - 1``, as ordinary trials of the same study (claimed, resumed, recovered and
run by any executor; deduplicated by configuration and seed; not counted toward ``n_trials``).
What is trained next and when the race ends is :func:`race.replay` of the validation results
so far (the pure race, simulated by the tests): looks at an alpha-spending schedule, decided
verdicts and dropped challengers final, a challenger that beats the incumbent confirmed again
on seeds that did not pick it.  The winner's reported margin (:func:`result`) is the test split
of its selection-free seeds at the level of the look that ended the race, with its interval.
The test split steers nothing: selection and decisions read validation values only.
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import Optional

import optuna
from optuna.trial import TrialState
from scipy import stats

from ..compare import ALPHA, level_text, read_per_example
from ..errors import MDMError
from ..leaderboard import write_confirmation
from .plan import suggest_plan
from .race import Race, replay, reported
from .spec import SearchSpec
from .record import Confirmation, Outcome, StudyKey, TrialRecord, enqueue, records, study_get, study_set

log = logging.getLogger(__name__)

DECISION_SPLIT = "val"  # what decides (never the test split)
REPORT_SPLIT = "test"  # what the winner's selection-free margin is reported on


class Step(str, Enum):
    """What a worker does next once the search has its trials."""

    CLAIM = "claim"  # confirmation trials are waiting
    WAIT = "wait"  # this round's trials are still running elsewhere
    DONE = "done"  # nothing to confirm, or confirmed


def plan_overrides(spec: SearchSpec, rec: TrialRecord) -> dict:
    """``suggest_plan`` keywords of a confirmation trial: its fresh seed and evaluation strata."""
    return {"seed": rec.confirm.seed, "test_n_t": spec.confirm.test_n_t} if rec.confirm else {}


def _trained(study: optuna.Study, spec: SearchSpec, confirmation: bool) -> list[tuple[str, TrialRecord]]:
    """(config group, trial) of the decided trials that trained to completion (no duplicates),
    of the search or of the confirmation."""
    return [(group_of(spec, t), t) for t in records(study, states=(TrialState.COMPLETE,))
            if t.trained and bool(t.confirm) == confirmation]


def _plan_of(spec: SearchSpec, t: TrialRecord):
    return suggest_plan(optuna.trial.FixedTrial(dict(t.params)), spec, baseline=t.baseline,
                        **plan_overrides(spec, t))


def group_of(spec: SearchSpec, t: TrialRecord) -> str:
    """A trial's configuration up to the seed (recorded on it; recomputed for older studies)."""
    return t.config_group or _plan_of(spec, t).config_hash(spec, with_seed=False)


def select(study: optuna.Study, spec: SearchSpec) -> Optional[dict]:
    """The candidates, by mean validation BPD over the search's seeds; None without a completed
    searched configuration and a completed baseline."""
    groups: dict[str, list] = {}
    for group, t in _trained(study, spec, confirmation=False):
        groups.setdefault(group, []).append(t)
    ranked = sorted(groups.items(), key=lambda kv: (sum(t.values[0] for t in kv[1]) / len(kv[1]), kv[0]))
    searched = [(g, ts) for g, ts in ranked if not ts[0].baseline]
    baselines = [(g, ts) for g, ts in ranked if ts[0].baseline]
    if not searched or not baselines:
        return None

    def candidate(role: str, group: str, trials: list) -> dict:
        first = trials[0]
        return {"group": group, "role": role, "label": _plan_of(spec, first).label(), "baseline": first.baseline,
                "params": {k: v for k, v in first.params.items() if k != "seed"},
                "search_trials": sorted(t.number for t in trials),
                "search_val": sum(t.values[0] for t in trials) / len(trials)}

    cands = [candidate("incumbent", *searched[0]), candidate("baseline", *baselines[0])]
    cands += [candidate("challenger", g, ts) for g, ts in searched[1:spec.confirm.top_k]]
    return {"candidates": cands, "horizons": [spec.confirm.seeds], "min_seeds": spec.confirm.min_seeds}


def horizons(plan: dict, spec: SearchSpec) -> list[int]:
    """Margin seeds per segment of the race: its own ``confirm.seeds``, then one per reopening
    with more seeds (plans stored before segments were kept: the spec's seeds)."""
    return list(plan.get("horizons") or [spec.confirm.seeds])


def min_seeds_of(plan: Optional[dict], spec: SearchSpec) -> int:
    """The first look of the race: frozen in the plan when the race starts (a reopening keeps its
    schedule, so rounds already played are judged as they were); plans stored before: the spec's."""
    return int((plan or {}).get("min_seeds") or spec.confirm.min_seeds)


def with_horizon(plan: dict, seeds: int) -> dict:
    """The plan reopened for ``seeds`` margin seeds: a new segment when that is more than the last."""
    have = list(plan.get("horizons") or [seeds])
    return {**plan, "horizons": have + [seeds] if seeds > have[-1] else have}


def fresh_runs(study: optuna.Study) -> dict[str, list[tuple[int, str]]]:
    """{config group: [(fresh seed, artifact dir)]} of the completed confirmation trials (the
    group their plan was enqueued for)."""
    runs: dict[str, list] = {}
    for t in records(study, states=(TrialState.COMPLETE,)):
        if t.confirm and t.outcome == Outcome.COMPLETE and t.artifact_dir:
            runs.setdefault(t.confirm.group, []).append((t.confirm.seed, t.artifact_dir))
    return runs


def fresh_values(study: optuna.Study, split: str) -> dict[str, dict[int, object]]:
    """{config group: {round: per-example BPDs of ``split``}} of the completed confirmation
    trials (the first trial of a group and round counts)."""
    out: dict[str, dict] = {}
    for t in records(study, states=(TrialState.COMPLETE,)):
        if t.confirm and t.outcome == Outcome.COMPLETE and t.artifact_dir:
            rounds = out.setdefault(t.confirm.group, {})
            if t.confirm.round not in rounds:
                rounds[t.confirm.round] = read_per_example(t.artifact_dir, split=split)
    return out


def race(plan: dict, study: optuna.Study, spec: SearchSpec, split: str = DECISION_SPLIT) -> tuple[Race, int]:
    """(the race replayed on the confirmation trials' ``split``, rounds played so far)."""
    rounds = max((t.confirm.round for t in records(study) if t.confirm), default=0)
    return replay(plan["candidates"], fresh_values(study, split), horizons(plan, spec), min_seeds_of(plan, spec),
                  rounds), rounds


def finished(study: optuna.Study, spec: SearchSpec) -> bool:
    """Nothing (more) to confirm."""
    return not spec.confirm.seeds or bool(study_get(study, StudyKey.CONFIRMATION))


def next_step(study: optuna.Study, spec: SearchSpec) -> Step:
    """Called under the study lock once the search has its trials: enqueue the next round if
    the last one is decided and the race goes on.  Returns what the worker does next."""
    if finished(study, spec):
        return Step.DONE
    plan = study_get(study, StudyKey.CONFIRM_PLAN)
    if plan is None:
        plan = select(study, spec)
        if plan is None:
            _finish(study, spec, None, "no completed searched configuration and baseline to confirm", 0)
            return Step.DONE
        study_set(study, StudyKey.CONFIRM_PLAN, plan)
        log.info("confirming on fresh seeds: %s", "; ".join(f"{c['role']} {c['label']}" for c in plan["candidates"]))
    mine = [t for t in records(study) if t.confirm]
    if any(t.state == TrialState.WAITING for t in mine):
        return Step.CLAIM
    if any(t.state == TrialState.RUNNING for t in mine):
        return Step.WAIT
    state, rounds = race(plan, study, spec)
    if state.done:
        _finish(study, spec, plan, None, rounds)
        return Step.DONE
    by_group = {c["group"]: c for c in plan["candidates"]}
    _enqueue_round(study, spec, [by_group[g] for g in state.train], state.next_round, mine)
    return Step.CLAIM


def _enqueue_round(study: optuna.Study, spec: SearchSpec, active: list[dict], round_: int, mine: list) -> None:
    seed = spec.confirm.seed_start + round_ - 1
    have = {(t.confirm.group, t.confirm.seed) for t in mine
            if t.state != TrialState.FAIL or t.final}  # (a dead worker's try is retried)
    for c in active:
        if (c["group"], seed) in have:
            continue
        enqueue(study, c["params"], confirm=Confirmation(c["group"], c["role"], seed, round_),
                **({"baseline": c["baseline"]} if c["baseline"] else {}))
    log.info("confirmation round %d: %d configuration(s) on fresh seed %d", round_, len(active), seed)


def _finish(study: optuna.Study, spec: SearchSpec, plan: Optional[dict], why: Optional[str], rounds: int) -> None:
    info = {"done": True, "rounds": rounds, "reason": why}
    if plan is not None:
        info.update(result(plan, study, spec))
    study_set(study, StudyKey.CONFIRMATION, info)
    write_confirmation(spec.leaderboard_root, spec.data.name, spec.study, info)
    role = (info.get("winner") or {}).get("role")
    log.info("confirmation ended after %d round(s): %s%s", rounds, headline(info), f" (the {role})" if role else "")


def result(plan: dict, study: optuna.Study, spec: SearchSpec) -> dict:
    """The winner, the seeds behind its margin, and its selection-free margin to the baseline:
    the test split of the seeds that did not pick it, at the level of the look that ended the
    race (``vs_baseline``, with its interval); the decisions' validation comparisons beside it.
    Keys added to the original ones: ``level``, ``decided_at_round``, ``switched_at_round``,
    ``horizons``, ``looks`` and ``challenger_status`` (better, worse, tie or stopped)."""
    state, _ = race(plan, study, spec)
    by_group = {c["group"]: c for c in plan["candidates"]}
    winner, baseline = by_group[state.winner], next(c for c in plan["candidates"] if c["role"] == "baseline")
    margin = reported(state, fresh_values(study, REPORT_SPLIT), baseline["group"])
    seed_of = {t.confirm.round: t.confirm.seed for t in records(study) if t.confirm}
    challengers = [c["group"] for c in plan["candidates"] if c["role"] == "challenger"]
    told = {g: state.challengers.get(g, {"comparison": None, "status": None}) for g in challengers}
    return {"winner": {k: winner[k] for k in ("group", "role", "label", "search_trials")},
            "baseline": {k: baseline[k] for k in ("group", "label")},
            "fresh_seeds": sorted(seed_of[r] for r in state.margin_rounds if r in seed_of),
            "vs_baseline": margin.as_dict() if margin else None,
            "vs_baseline_val": state.decision.as_dict() if state.decision else None,
            "challengers": {by_group[g]["label"]: (c["comparison"].as_dict() if c["comparison"] else None)
                            for g, c in told.items()},
            "challenger_status": {by_group[g]["label"]: c["status"] for g, c in told.items()},
            "level": state.level, "decided_at_round": state.decided_at, "switched_at_round": state.switched_at,
            "horizons": horizons(plan, spec), "looks": state.looks}


def describe(info: dict) -> str:
    """One line: the confirmed winner and its selection-free margin, or why nothing was confirmed."""
    if not info.get("winner"):
        return f"nothing confirmed ({info.get('reason')})"
    return (f"{info['winner']['label']} ({info['winner']['role']}): "
            f"{margin_text(info.get('vs_baseline'), info.get('fresh_seeds') or [], info['baseline']['label'])}")


def confirmed_line(label: str, margin: Optional[dict], seeds: list, baseline: Optional[str]) -> str:
    """The line every view leads with once a confirmation has ended (status, leaderboard, report)."""
    return f"winner (confirmed): {label}: {margin_text(margin, seeds, baseline)}"


def headline(info: dict) -> str:
    """:func:`confirmed_line` of an ended confirmation's stored result; why nothing was confirmed."""
    if not info.get("winner"):
        return f"winner: nothing confirmed ({info.get('reason')})"
    return confirmed_line(info["winner"]["label"], info.get("vs_baseline"), info.get("fresh_seeds") or [],
                          info["baseline"]["label"])


def interval(margin: dict) -> Optional[tuple[float, float]]:
    """The 95% confidence interval of a stored comparison (``as_dict`` of a StructureComparison):
    its own bounds, or diff ± t_{0.975, df} SE for one stored before they were kept."""
    if margin.get("ci_low") is not None and margin.get("ci_high") is not None:
        return float(margin["ci_low"]), float(margin["ci_high"])
    se, df = margin.get("se"), margin.get("df")
    if se is None or df is None or not (math.isfinite(se) and math.isfinite(df)):
        return None
    h = float(stats.t.ppf(0.975, df)) * se
    return margin["diff"] - h, margin["diff"] + h


def margin_text(margin: Optional[dict], seeds: list, baseline: Optional[str]) -> str:
    """``-0.0031 [-0.0306, +0.0244] bpd vs VPSDE (...) on fresh seeds [1000, 1001, 1002], test
    split: tie within noise``: the one wording of a selection-free margin."""
    if not margin:
        return f"no fresh-seed results against {baseline}"
    ci = interval(margin)
    level = margin.get("alpha") or 0.05
    span = (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" + (f" ({level_text(level)})" if level != ALPHA else "")
            if ci else " (no interval: 1 seed)")
    return (f"{margin['diff']:+.4f}{span} bpd vs {baseline} on fresh seeds {list(seeds)}, {REPORT_SPLIT} split: "
            f"{margin['verdict']} (P(better) {margin['p_better']:.2f})")



# ---------------------------------------------------------------------- after the fact: `mdmsearch confirm`
def prepare(spec: SearchSpec, study: optuna.Study, *, top_k: int, seeds: int,
            steps: Optional[int] = None) -> SearchSpec:
    """The spec whose run confirms ``study``'s winner on ``seeds`` fresh seeds: the study itself
    at its own budget (its candidates, or those an earlier confirmation froze, race on), or, at
    another budget ``steps``, a confirmation-only study ``<study>.steps<S>`` of the same
    candidates (each configuration trained anew at S steps)."""
    from .spec import ConfirmSpec
    from .study import budget_used, count_trials, open_study

    stored = study_get(study, StudyKey.CONFIRM_PLAN)
    # the race's first look: as the race that started (its plan), else as the spec's confirm block
    first = min_seeds_of(stored, spec) if stored or spec.confirm.seeds else 2
    conf = ConfirmSpec(seeds=seeds, min_seeds=min(first, seeds), top_k=top_k, seed_start=spec.confirm.seed_start,
                       test_n_t=spec.confirm.test_n_t)
    plan = stored or select(study, spec.model_copy(update={"confirm": conf}))
    if plan is None:
        raise MDMError(f"study {study.study_name!r} has no completed searched configuration and baseline to confirm")
    if steps is None or steps == spec.budget.steps:
        challengers = sum(c["role"] == "challenger" for c in plan["candidates"])
        if stored and challengers != top_k - 1:
            log.warning("the %d candidates an earlier confirmation chose are kept (--top %d does not change them)",
                        len(plan["candidates"]), top_k)
        grown = with_horizon(plan, seeds)
        study_set(study, StudyKey.CONFIRM_PLAN, grown)
        if grown.get("horizons") != plan.get("horizons"):  # more seeds than the race had: it goes on
            _reopen(study, spec)
        return spec.model_copy(update={"confirm": conf, "n_trials": max(1, budget_used(count_trials(study)))})
    budget = spec.budget.model_copy(update={"steps": steps, "eval_every": min(spec.budget.eval_every, steps)})
    derived = spec.model_copy(update={"study": f"{spec.study}.steps{steps}", "budget": budget, "baselines": [],
                                      "n_trials": 1, "confirm": conf})
    dstudy = open_study(derived)
    study_set(dstudy, StudyKey.CONFIRM_ONLY, {"of": spec.study, "steps": steps})
    if not study_get(dstudy, StudyKey.CONFIRM_PLAN):
        moved = [{**c, "group": suggest_plan(optuna.trial.FixedTrial(dict(c["params"])), derived, baseline=c["baseline"])
                  .config_hash(derived, with_seed=False)} for c in plan["candidates"]]
        study_set(dstudy, StudyKey.CONFIRM_PLAN, {"candidates": moved, "from_study": spec.study, "horizons": [seeds],
                                                  "min_seeds": conf.min_seeds})
    study_set(dstudy, StudyKey.CONFIRM_PLAN, with_horizon(study_get(dstudy, StudyKey.CONFIRM_PLAN), seeds))
    _reopen(dstudy, derived)
    return derived


def _reopen(study: optuna.Study, spec: SearchSpec) -> None:
    """More seeds than an ended confirmation had: it goes on from where it stopped (until it ends
    again, the leaderboard and the report show no confirmed winner)."""
    if study_get(study, StudyKey.CONFIRMATION):
        study_set(study, StudyKey.CONFIRMATION, {})
        write_confirmation(spec.leaderboard_root, spec.data.name, study.study_name, {})


def rank_agreement(study: optuna.Study) -> dict:
    """Whether the search's ranking of the candidates (their validation BPD on the search's
    seeds and budget) holds on the fresh seeds (mean validation BPD of the confirmation
    trials): Kendall's tau over the candidates with results, and whether the incumbent stays first."""
    from scipy.stats import kendalltau

    plan = study_get(study, StudyKey.CONFIRM_PLAN) or {"candidates": []}
    values: dict[str, list[float]] = {}
    for t in records(study, states=(TrialState.COMPLETE,)):
        if t.confirm and t.trained:
            values.setdefault(t.confirm.group, []).append(float(t.values[0]))
    rows = [{"label": c["label"], "role": c["role"], "search_val": c["search_val"],
             "fresh_val": sum(values[c["group"]]) / len(values[c["group"]]) if c["group"] in values else None,
             "fresh_seeds": len(values.get(c["group"], []))} for c in plan["candidates"]]
    ranked = [r for r in rows if r["fresh_val"] is not None]
    tau = float(kendalltau([r["search_val"] for r in ranked], [r["fresh_val"] for r in ranked]).statistic) \
        if len(ranked) >= 2 else math.nan
    first = min(ranked, key=lambda r: r["fresh_val"]) if ranked else None
    searched = [r for r in ranked if r["role"] != "baseline"]
    best_searched = min(searched, key=lambda r: r["fresh_val"]) if searched else None
    return {"candidates": rows, "kendall_tau": None if math.isnan(tau) else tau,
            "incumbent_first": bool(best_searched and best_searched["role"] == "incumbent"),
            "first_overall": first["label"] if first else None}


__all__ = ["Step", "confirmed_line", "describe", "headline", "interval", "margin_text", "finished", "group_of", "next_step", "plan_overrides", "prepare", "rank_agreement", "result", "select"]
