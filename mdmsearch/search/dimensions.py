"""The search space, declared once.

Every dimension a trial can vary is one :class:`Dim` (:data:`HYPER_DIMENSIONS`, :data:`SEED`,
:data:`STRUCTURE_DIMENSIONS`): what the spec offers
for it, when it is asked at all, when its value changes nothing (an alias), and where it lands
in the run config.  Everything else is derived from this table:

* ``plan.suggest_plan`` asks the dimensions in this order (define-by-run, for every executor);
* ``plan.TrialPlan.run_config`` puts each value at its ``run_key``;
* ``plan.TrialPlan.config_hash`` leaves out the ``inert`` values (aliases share a hash);
* ``baselines.baseline_grid`` searches a baseline's applicable (not inert) hyperparameters on a grid;
* ``study.grid_space`` lists the choices the grid sampler walks;
* ``space`` (the dry run, the exhaustion check) tells structure from hyperparameter dimensions.

The per-entry structure search (each free entry of U and L on or off) adds dimensions named
``q_ij`` / ``l_ij`` whose number depends on K; they are structure dimensions by their prefix
(:data:`PER_ENTRY_PREFIXES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from .spec import FloatRange, SearchSpec

Kind = Literal["hyper", "seed", "structure"]
Options = Union[FloatRange, list]


def _always(values: dict) -> bool:
    return True


def _never(values: dict) -> bool:
    return False


def _same(value: Any, values: dict) -> Any:
    return value


def default_value(r: FloatRange) -> float:
    """The value baselines use for a searched float: fixed value, first choice or range midpoint."""
    if r.value is not None:
        return r.value
    if r.choices is not None:
        return r.choices[0]
    return math.sqrt(r.low * r.high) if r.log else 0.5 * (r.low + r.high)


@dataclass(frozen=True)
class Dim:
    """One dimension of the search space."""

    name: str
    kind: Kind
    options: Callable[[SearchSpec], Options]  # a FloatRange (value, choices or range) or a list of choices
    run_key: Optional[tuple[str, str]] = None  # (run-config section, key) the value sets
    active: Callable[[dict], bool] = _always  # asked at all, given the values decided before it
    # decided, but changes nothing: left out of the configuration hash (given the hyperparameters,
    # n_aux and fixed_process: no entry of Q, D trained)
    inert: Callable[[dict], bool] = _never
    canonical: Callable[[Any, dict], Any] = _same  # the value as hashed (two spellings of one run: one hash)

    def choices(self, spec: SearchSpec) -> Optional[list]:
        """The finite choices, or None for a continuous range."""
        opts = self.options(spec)
        if isinstance(opts, FloatRange):
            if opts.value is not None:
                return [opts.value]
            return list(opts.choices) if opts.choices is not None else None
        return list(opts)

    def searched(self, spec: SearchSpec) -> bool:
        """More than one value: the trial asks for it (a single value is fixed, not a parameter)."""
        choices = self.choices(spec)
        return choices is None or len(choices) > 1

    def default(self, spec: SearchSpec) -> Any:
        """The value a baseline takes: the fixed value, the first choice or the range's midpoint."""
        opts = self.options(spec)
        return default_value(opts) if isinstance(opts, FloatRange) else list(opts)[0]


def predictor_choices(spec: SearchSpec) -> dict[str, list[str]]:
    """Searched (or fixed) noise-predictor options: parameterization and residual statistics."""
    return {"parameterization": list(spec.hyper.parameterization or [spec.model.parameterization]),
            "residual_stats": list(spec.hyper.residual_stats or [spec.model.residual_stats])}


def _resolved(parameterization: str, values: dict) -> str:
    """``auto`` is the predictor it resolves to (mixed with auxiliary variables, eps without)."""
    from ..config import resolve_parameterization

    return resolve_parameterization(parameterization, values.get("n_aux", 0))


def _resolved_eps(values: dict) -> bool:
    """The noise predictor resolves to eps: no Gaussian part, so no statistics."""
    return _resolved(values["parameterization"], values) == "eps"


HYPER_DIMENSIONS: tuple[Dim, ...] = (
    Dim("lr", "hyper", lambda s: s.hyper.lr, ("optim", "lr")),
    # a fixed process (a baseline, or a learned structure with learn: false) has no entries to learn
    Dim("process_lr", "hyper", lambda s: s.hyper.process_lr, ("optim", "process_lr"),
        inert=lambda v: v.get("fixed_process", False)),
    # without auxiliary variables their initial variance gamma changes nothing
    Dim("gamma", "hyper", lambda s: s.hyper.gamma, ("process", "gamma"), inert=lambda v: v.get("n_aux", 0) == 0),
    Dim("beta_1", "hyper", lambda s: s.hyper.beta_1, ("process", "beta_1")),
    Dim("time_sampler", "hyper", lambda s: s.hyper.time_sampler, ("train", "time_sampler")),
    Dim("parameterization", "hyper", lambda s: predictor_choices(s)["parameterization"], ("model", "parameterization"),
        canonical=_resolved),
    # the statistics mean nothing without the Gaussian part: not asked for eps, inert when auto resolves to eps
    Dim("residual_stats", "hyper", lambda s: predictor_choices(s)["residual_stats"], ("model", "residual_stats"),
        active=lambda v: v["parameterization"] != "eps", inert=_resolved_eps),
)
SEED = Dim("seed", "seed", lambda s: s.seeds, ("train", "seed"))
STRUCTURE_DIMENSIONS: tuple[Dim, ...] = (
    Dim("n_aux", "structure", lambda s: s.structure.n_aux),
    Dim("d_param", "structure", lambda s: s.structure.d_param),
    Dim("learn", "structure", lambda s: s.structure.learn),
    # one variable: Q = 0 and D = [[d]] whatever the patterns say (asking would only alias)
    Dim("q_pattern", "structure", lambda s: s.structure.q_patterns, active=lambda v: v["n_aux"] > 0),
    Dim("d_pattern", "structure", lambda s: s.structure.d_patterns, active=lambda v: v["n_aux"] > 0),
)
PER_ENTRY_PREFIXES = ("q_", "l_")  # per-entry structure dimensions: q_ij (U), l_ij (L)


def hyper() -> tuple[Dim, ...]:
    """The hyperparameter dimensions, in the order a trial asks them (read at call time)."""
    return HYPER_DIMENSIONS


def structure() -> tuple[Dim, ...]:
    return STRUCTURE_DIMENSIONS


def all_dims() -> tuple[Dim, ...]:
    return (*HYPER_DIMENSIONS, SEED, *STRUCTURE_DIMENSIONS)


def by_name(name: str) -> Optional[Dim]:
    return next((d for d in all_dims() if d.name == name), None)


def kind_of(name: str) -> Kind:
    """The kind of a trial parameter: declared, or a per-entry structure dimension."""
    dim = by_name(name)
    if dim is not None:
        return dim.kind
    if name.startswith(PER_ENTRY_PREFIXES):
        return "structure"
    raise KeyError(f"{name!r} is not a dimension of the search space")


def is_structural(name: str) -> bool:
    return kind_of(name) == "structure"


__all__ = ["Dim", "HYPER_DIMENSIONS", "PER_ENTRY_PREFIXES", "SEED", "STRUCTURE_DIMENSIONS", "all_dims", "by_name",
           "default_value", "hyper", "is_structural", "kind_of", "predictor_choices", "structure"]
