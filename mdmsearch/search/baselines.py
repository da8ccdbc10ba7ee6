"""Fair baselines: a baseline is a fixed *structure*, and its hyperparameters are searched.

A learned structure is searched jointly with the hyperparameters of the spec (time sampler,
learning rates, gamma, ...).  A baseline (VPSDE, CLD, ALDA, MALDA) fixes Q and D, nothing
else: the hyperparameters that apply to it are searched too, on a grid, so that the
confirmation (``confirm.select``: the best baseline configuration by mean validation BPD over
the search's seeds) races the best-tuned baseline, not the one that happened to get the
defaults.  The rule (docs/search.md, "Fair baselines"):

* the grid of a baseline is every combination of the values of the searched hyperparameters:
  a list's choices, or for a continuous range the centres of ``CONTINUOUS_POINTS`` equal bins
  in its scale (log or linear), the midpoint first;
* values that change nothing for the baseline are aliases, not configurations: the combinations
  are deduplicated by the configuration hash, which leaves out the inert dimensions
  (``dimensions.Dim.inert``: process_lr for a fixed process, gamma without auxiliary variables,
  the residual statistics under eps), keeping the first spelling (the defaults);
* the first configuration is the one every baseline used before (every value at its default:
  first choice, range midpoint); beyond ``spec.baseline_configs`` configurations, that one and a
  seeded random draw of the rest (``sampler.seed`` and the baseline's name) are kept;
* each configuration runs on every seed of ``spec.seeds``, at the same budget as a search trial
  (steps, evaluations; never pruned), enqueued when the study is created, and counts toward
  ``n_trials`` like every trial of the search.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

import optuna

from . import dimensions
from .dimensions import SEED, Dim, default_value
from .plan import suggest_plan
from .spec import FloatRange, SearchSpec

CONTINUOUS_POINTS = 3  # points of a continuous range in a baseline's grid (bin centres)
MAX_COMBINATIONS = 20_000  # combinations enumerated per baseline before the rest is left out


@dataclass(frozen=True)
class BaselineGrid:
    """One baseline's searched configurations (trial parameters without the seed), the default
    first; ``distinct``: how many there were before ``baseline_configs`` kept some of them;
    ``searched``: the parameters that differ between them (the others are inert for it, or fixed)."""

    name: str
    configs: list[dict[str, Any]]
    distinct: int
    searched: tuple[str, ...]


def _varied(configs: list[dict]) -> tuple[str, ...]:
    """The parameters whose value differs between ``configs``."""
    names = sorted({k for c in configs for k in c})
    return tuple(k for k in names if len({repr(c.get(k)) for c in configs}) > 1)


def range_points(r: FloatRange, n: int = CONTINUOUS_POINTS) -> list[float]:
    """Centres of ``n`` equal bins of a continuous range in its scale, the midpoint (the default)
    first: for low=1e-4, high=1e-2, log, n=3: [1e-3, 2.15e-4, 4.64e-3]."""
    fractions = sorted(((i + 0.5) / n for i in range(n)), key=lambda f: (abs(f - 0.5), f))
    return [default_value(r) if f == 0.5 else _at(r, f) for f in fractions]  # (the default exactly, as before)


def _at(r: FloatRange, f: float) -> float:
    """The point a fraction ``f`` along a range in its scale: x = low * (high / low)^f for a log
    range (equal bins of log x), low + f (high - low) otherwise."""
    if r.log:
        return math.exp(math.log(r.low) + f * (math.log(r.high) - math.log(r.low)))
    return r.low + f * (r.high - r.low)


def grid_values(dim: Dim, spec: SearchSpec) -> list:
    """A searched dimension's values in a baseline's grid, the default first."""
    choices = dim.choices(spec)
    return choices if choices is not None else range_points(dim.options(spec))


def baseline_grid(spec: SearchSpec, name: str) -> BaselineGrid:
    """The distinct configurations of baseline ``name``: the grid of the searched hyperparameters,
    deduplicated by configuration hash (inert values are aliases), at most ``baseline_configs``."""
    searched = [d for d in dimensions.hyper() if d.searched(spec)]
    seen: set[str] = set()
    configs: list[dict] = []
    combos = itertools.product(*(grid_values(d, spec) for d in searched))
    for values in itertools.islice(combos, MAX_COMBINATIONS):
        trial = optuna.trial.FixedTrial({d.name: v for d, v in zip(searched, values)})
        plan = suggest_plan(trial, spec, baseline=name, seed=spec.seeds[0])  # (the seed is not a parameter here)
        key = plan.config_hash(spec, with_seed=False)
        if key not in seen:
            seen.add(key)
            configs.append(dict(plan.params))  # what the plan asked: an unasked value is not enqueued
    return BaselineGrid(name, _kept(configs, spec, name), len(configs), _varied(configs))


def _kept(configs: list[dict], spec: SearchSpec, name: str) -> list[dict]:
    """The default configuration and a seeded draw of the others, in grid order."""
    if len(configs) <= spec.baseline_configs:
        return configs
    rng = random.Random(f"{spec.sampler.seed}/{name}")  # (a string seed: the same draw in every process)
    drawn = sorted(rng.sample(range(1, len(configs)), spec.baseline_configs - 1))
    return [configs[0]] + [configs[i] for i in drawn]


def baseline_grids(spec: SearchSpec) -> list[BaselineGrid]:
    return [baseline_grid(spec, name) for name in spec.baselines]


def baseline_trials(spec: SearchSpec) -> list[tuple[str, dict]]:
    """(baseline, enqueued parameters) of every baseline trial, in the order they are enqueued:
    seed by seed, the defaults of all baselines first (the pruner's yardstick early), then each
    baseline's next configuration in turn."""
    grids = baseline_grids(spec)
    depth = max((len(g.configs) for g in grids), default=0)
    out = []
    for seed in spec.seeds:
        for i in range(depth):
            for g in grids:
                if i < len(g.configs):
                    out.append((g.name, {**g.configs[i], **({SEED.name: seed} if SEED.searched(spec) else {})}))
    return out


__all__ = ["BaselineGrid", "CONTINUOUS_POINTS", "baseline_grid", "baseline_grids", "baseline_trials", "grid_values",
           "range_points"]
