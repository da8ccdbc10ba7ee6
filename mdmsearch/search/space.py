"""The search space of a spec, enumerated: what `mdmsearch run SPEC --dry-run` prints, and how
the search knows that a finite space is exhausted.

The enumeration runs the very define-by-run function the executors run
(:func:`mdmsearch.search.plan.suggest_plan`) with a probing trial that answers every
categorical choice in turn, so it sees exactly the parameters a trial would see, in the
same order, and the same aliasing (patterns that give equal masks, gamma at K = 0, residual
statistics under ``eps``) through the structure and configuration hashes.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import MDMError
from . import dimensions
from .dimensions import default_value, is_structural
from .baselines import BaselineGrid, baseline_grids
from .plan import TrialPlan, suggest_plan
from .spec import FloatRange, SearchSpec

log = logging.getLogger(__name__)

MAX_STRUCTURES = 5000  # leaves of the structure tree enumerated before giving up (per-entry spaces)


class _Branch(Exception):
    """A categorical parameter with no answer yet: the walk branches over its choices."""

    def __init__(self, name: str, choices: list):
        super().__init__(name)
        self.name = name
        self.choices = choices


class _Probe:
    """The part of Optuna's trial API that :func:`suggest_plan` uses, answering from ``fixed``.

    An unanswered categorical raises :class:`_Branch` when ``branch(name)`` says so and takes
    its first choice otherwise; a float range is continuous: it takes the baselines' default
    and is recorded in ``continuous``."""

    def __init__(self, fixed: dict[str, Any], branch):
        self.fixed = dict(fixed)
        self.branch = branch
        self.params: dict[str, Any] = {}
        self.continuous: list[str] = []

    def suggest_categorical(self, name: str, choices):
        choices = list(choices)
        if name not in self.fixed:
            if self.branch(name):
                raise _Branch(name, choices)
            self.fixed[name] = choices[0]
        self.params[name] = self.fixed[name]
        return self.fixed[name]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        self.continuous.append(name)
        value = default_value(FloatRange(low=low, high=high, log=log))
        self.params[name] = value
        return value


def _walk(spec: SearchSpec, branch, fixed: Optional[dict] = None, limit: int = MAX_STRUCTURES) -> Optional[list]:
    """All leaves (plan, probe) of the define-by-run tree over the parameters ``branch`` selects;
    None when there are more than ``limit``."""
    leaves: list[tuple[TrialPlan, _Probe]] = []
    stack = [dict(fixed or {})]
    while stack:
        answers = stack.pop()
        probe = _Probe(answers, branch)
        try:
            plan = suggest_plan(probe, spec)
        except _Branch as b:
            stack.extend({**answers, b.name: c} for c in reversed(b.choices))
            continue
        leaves.append((plan, probe))
        if len(leaves) > limit:
            return None
    return leaves


@dataclass
class Structure:
    """One distinct learned structure (masks, parameterization of D, learned or frozen)."""

    plan: TrialPlan
    names: list[str]  # pattern spellings that alias to it, e.g. ["Q:full D:full", "Q:chain D:full"]
    valid: bool = True
    reason: str = ""

    @property
    def label(self) -> str:
        return f"K={self.plan.n_aux} {self.names[0]}"


@dataclass
class SpaceSummary:
    raw_structures: Optional[int]  # leaves of the structure tree (None: too many to enumerate)
    structures: list[Structure] = field(default_factory=list)  # distinct after aliasing
    hyper: dict[str, str] = field(default_factory=dict)  # name -> "fixed 0.002", "3 choices", "continuous"
    continuous: list[str] = field(default_factory=list)
    configs: Optional[int] = None  # distinct searched configurations x seeds (None: infinite/unknown)
    baselines: int = 0  # baseline runs: each baseline's grid of hyperparameters x seeds (search/baselines.py)
    baseline_grids: list[BaselineGrid] = field(default_factory=list)

    @property
    def valid(self) -> list[Structure]:
        return [s for s in self.structures if s.valid]

    @property
    def finite(self) -> bool:
        return self.configs is not None


def _structure_key(plan: TrialPlan) -> tuple:
    return (plan.n_aux, plan.d_param, plan.learn, str(plan.q_mask), str(plan.d_mask))


def enumerate_space(spec: SearchSpec, *, check: bool = True) -> SpaceSummary:
    """Distinct structures (valid or not, with reasons), the hyperparameter choices, and the
    number of distinct configurations (None if a hyperparameter is continuous or the structure
    space is too large to enumerate)."""
    leaves = _walk(spec, is_structural)
    grids = baseline_grids(spec)
    summary = SpaceSummary(raw_structures=None if leaves is None else len(leaves),
                           baselines=sum(len(g.configs) for g in grids) * len(spec.seeds), baseline_grids=grids)
    summary.hyper = _hyper_table(spec)
    if leaves is None:
        return summary
    by_key: dict[tuple, Structure] = {}
    for plan, _ in leaves:
        name = f"Q:{plan.q_pattern} D:{plan.d_pattern}" + (f" ({plan.d_param})" if len(spec.structure.d_param) > 1 else "")
        if not plan.learn:
            name += " frozen"
        key = _structure_key(plan)
        if key in by_key:
            by_key[key].names.append(name)
        else:
            by_key[key] = Structure(plan, [name])
    summary.structures = list(by_key.values())
    if check:
        for s in summary.structures:
            res = s.plan.check(spec)
            s.valid, s.reason = res.valid, res.reason or ""
    configs, continuous = _count_configs(spec, summary.valid if check else summary.structures)
    summary.continuous = continuous
    summary.configs = None if continuous else configs
    return summary


def _count_configs(spec: SearchSpec, structures: list[Structure]) -> tuple[int, list[str]]:
    """Distinct (configuration hash) searched configurations over all seeds, and the continuous
    hyperparameters.  The hyperparameters' aliasing depends only on K and on whether Q, D are
    learned (gamma at K = 0, process_lr when frozen), so it is counted once per (K, learn) and
    multiplied by its distinct structures."""
    per_k: dict[tuple, int] = {}
    continuous: set[str] = set()
    for s in structures:
        k = (s.plan.n_aux, s.plan.learn)
        if k not in per_k:
            fixed = {name: value for name, value in s.plan.params.items() if is_structural(name)}
            leaves = _walk(spec, lambda name: not is_structural(name), fixed, limit=100_000) or []
            per_k[k] = len({plan.config_hash(spec) for plan, _ in leaves})
            for _, probe in leaves:
                continuous.update(probe.continuous)
    return sum(per_k[(s.plan.n_aux, s.plan.learn)] for s in structures), sorted(continuous)


def _hyper_table(spec: SearchSpec) -> dict[str, str]:
    """Each hyperparameter dimension (and the seed): fixed, its choices, or its continuous range."""
    out = {}
    for dim in (*dimensions.hyper(), dimensions.SEED):
        r = dim.options(spec)
        if not isinstance(r, FloatRange):
            out[dim.name] = _list_text(r)
        elif r.value is not None:
            out[dim.name] = f"fixed {r.value:g}"
        elif r.choices is not None:
            out[dim.name] = f"{len(r.choices)} choices {r.choices}"
        else:
            out[dim.name] = f"continuous [{r.low:g}, {r.high:g}]{' log' if r.log else ''}"
    return out


def _list_text(values: list) -> str:
    return f"fixed {values[0]}" if len(values) == 1 else f"{len(values)} choices {list(values)}"


# ---------------------------------------------------------------------- time estimate
@dataclass
class TimeEstimate:
    step_s: float  # one training step of the largest valid structure
    eval_s: float  # one network evaluation per example and time sample (eval mode)
    trial_s: float  # one trial at full budget
    label: str  # which structure was timed
    confirm_trial_s: float = 0.0  # one confirmation trial (its final evaluation at confirm.test_n_t)


def estimate_time(spec: SearchSpec, summary: SpaceSummary, repeats: int = 3) -> Optional[TimeEstimate]:
    """Time a few training steps and a small evaluation of the largest valid structure (the
    slowest) on this machine, and extrapolate one full trial: its training steps, the periodic
    validation, the final evaluation of both held-out splits and the samples."""
    import torch

    from ..data import load_cached
    from ..training import Trainer

    valid = summary.valid
    if not valid:
        return None
    biggest = max(valid, key=lambda s: (s.plan.n_aux, sum(map(sum, s.plan.d_mask)) + sum(map(sum, s.plan.q_mask))))
    data = load_cached(spec.data)
    cfg = biggest.plan.run_config(spec)
    torch.set_num_threads(spec.budget.threads)
    with tempfile.TemporaryDirectory(prefix="mdmsearch-dry-run-") as tmp:
        trainer = Trainer(cfg, tmp, data=data)
        trainer.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            trainer.train_step()
        step_s = (time.perf_counter() - t0) / repeats
        # batches as large as a real evaluation's: with 32 examples the per-call overhead made
        # an evaluated example look ~10x dearer than in a trial's final evaluation
        n_ex, n_t = min(256, int(data.val.shape[0])), 4
        trainer.evaluate("val", n_examples=n_ex, n_t=1)  # warm-up
        t0 = time.perf_counter()
        trainer.evaluate("val", n_examples=n_ex, n_t=n_t)
        eval_s = (time.perf_counter() - t0) / (n_t * n_ex)
    b = spec.budget
    n_heldout = int(data.val.shape[0]) + int(data.test.shape[0])
    evals = (b.steps // b.eval_every) * min(b.eval_examples, int(data.val.shape[0])) * b.eval_n_t

    def work(test_n_t: int) -> float:
        return b.steps * step_s + (evals + n_heldout * test_n_t + b.n_samples * b.sample_steps) * eval_s

    return TimeEstimate(step_s, eval_s, work(b.test_n_t), biggest.label,
                        work(spec.confirm.test_n_t or b.test_n_t))


def describe(spec: SearchSpec, summary: SpaceSummary, estimate: Optional[TimeEstimate]) -> str:
    """The dry-run report, plain text."""
    lines = [f"study {spec.study}: dataset {spec.data.name}, {spec.budget.steps} steps per trial, "
             f"n_trials {spec.n_trials}, {spec.workers} worker(s), sampler {spec.sampler.name}, pruner {spec.pruner.name}"]
    if summary.raw_structures is None:
        lines.append(f"structures: more than {MAX_STRUCTURES} combinations (per-entry search): not enumerated")
    else:
        valid = summary.valid
        aliases = summary.raw_structures - len(summary.structures)
        lines.append(f"structures: {summary.raw_structures} combinations -> {len(summary.structures)} distinct after "
                     f"aliasing ({aliases} alias{'es' if aliases != 1 else ''}), {len(valid)} valid, "
                     f"{len(summary.structures) - len(valid)} invalid")
        for s in sorted(summary.structures, key=lambda s: (s.plan.n_aux, not s.valid, s.label)):
            same = f"  (= {', '.join(s.names[1:])})" if len(s.names) > 1 else ""
            status = "valid" if s.valid else f"INVALID: {s.reason}"
            lines.append(f"  K={s.plan.n_aux} {s.names[0]:<24s} {status}{same}")
    lines.append("hyperparameters: " + "; ".join(f"{k} {v}" for k, v in summary.hyper.items()))
    if 0 in {s.plan.n_aux for s in summary.structures} and "fixed" not in summary.hyper["gamma"]:
        lines.append("  (gamma is ignored at K = 0: no auxiliary variables to start)")
    if summary.finite:
        lines.append(f"configurations: {summary.configs} distinct searched configurations (all seeds)")
        if summary.configs < spec.n_trials:
            lines.append(f"  n_trials {spec.n_trials} exceeds the space: the search stops once all "
                         f"{summary.configs} are tried")
    elif summary.continuous:
        lines.append(f"configurations: unbounded (continuous: {', '.join(summary.continuous)})")
    lines.extend(_baseline_lines(spec, summary))
    if estimate is not None:
        # baseline runs count toward n_trials; a finite space stops once exhausted
        trained = min(spec.n_trials, summary.configs + summary.baselines) if summary.finite else spec.n_trials
        total = estimate.trial_s * trained / spec.workers
        lines.append(f"estimated time: {estimate.trial_s:.0f} s per trial at full budget ({estimate.label}: "
                     f"{estimate.step_s * 1e3:.0f} ms/step, {estimate.eval_s * 1e3:.2f} ms per evaluated example "
                     f"and time); {trained} trained trials on {spec.workers} worker(s): about "
                     f"{_duration(total)} without pruning")
    if spec.confirm.seeds:
        c = spec.confirm
        lines.append(f"confirmation: then up to {(c.top_k + 1) * c.seeds} trials (the winner, the best baseline and "
                     f"{c.top_k - 1} runner(s)-up on up to {c.seeds} fresh seeds from {c.seed_start}, "
                     f"{c.test_n_t or spec.budget.test_n_t} strata each)")
        if estimate is not None:
            # a round trains its candidates side by side; the next round waits for all of them
            per_round = math.ceil((c.top_k + 1) / spec.workers) * estimate.confirm_trial_s
            lines.append(f"  about {_duration(per_round * c.seeds)} if it runs all {c.seeds} rounds "
                         f"({estimate.confirm_trial_s:.0f} s per trial, {c.top_k + 1} per round on {spec.workers} "
                         f"worker(s)); a decided verdict can end it sooner")
    return "\n".join(lines)


def _baseline_lines(spec: SearchSpec, summary: SpaceSummary) -> list[str]:
    """The baselines' grids (search/baselines.py), and what their runs leave of n_trials."""
    if not summary.baseline_grids:
        return ["baselines: none"]
    searched = [d.name for d in dimensions.hyper() if d.searched(spec)]
    parts = []
    for g in summary.baseline_grids:
        count = f"{len(g.configs)} of {g.distinct}" if len(g.configs) < g.distinct else f"{len(g.configs)}"
        inert = ", ".join(n for n in searched if n not in g.searched)
        what = ", ".join(g.searched) or "nothing to search"
        parts.append(f"{g.name.upper()} {count} ({what}" + (f"; inert: {inert})" if inert else ")"))
    lines = [f"baselines: {summary.baselines} run(s), each baseline's applicable hyperparameters on a grid x "
             f"{len(spec.seeds)} seed(s): " + "; ".join(parts)]
    left = spec.n_trials - summary.baselines
    if left > 0:
        lines.append(f"  baseline runs count toward n_trials: {left} of {spec.n_trials} left for the searched structures")
    else:
        lines.append(f"  n_trials {spec.n_trials} <= {summary.baselines} baseline runs: only the first {spec.n_trials} "
                     "run and no structure is searched; raise n_trials or lower baseline_configs")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def finite_size(spec: SearchSpec) -> Optional[int]:
    """Distinct searched configurations of a finite space (None: unbounded or too large)."""
    try:
        summary = enumerate_space(spec)
    except (MDMError, ValueError, RuntimeError) as exc:  # the search runs on, without the exhaustion check
        log.warning("could not enumerate the search space (%s); exhaustion is detected by repeats only", exc)
        return None
    return summary.configs if summary.finite else None


__all__ = ["SpaceSummary", "Structure", "TimeEstimate", "describe", "enumerate_space", "estimate_time",
           "finite_size"]
