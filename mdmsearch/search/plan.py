"""Define-by-run: turn an Optuna trial into a concrete training plan (structure + hyperparameters).

The same function serves the local executor and Ray Tune (through OptunaSearch), so both
search exactly the same space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..config import RunConfig, parse_run_config
from ..errors import CholeskyError
from ..leaderboard import config_label
from ..diffusion.structure import StructureCheck, check_matrices, check_structure, d_pattern, q_pattern, stable_hash
from . import dimensions
from .dimensions import SEED, Dim, default_value, predictor_choices  # noqa: F401  (re-exported for callers)
from .spec import FloatRange, SearchSpec
# budget keys that change neither the training nor the value told to the study's pruner: runs that
# differ only in these are one configuration (a confirmation trial's finer final evaluation)
EVALUATION_ONLY = {"device", "threads", "devices", "test_n_t", "n_samples", "sample_steps", "quality"}


@dataclass
class TrialPlan:
    """Everything a trial needs, independent of Optuna."""

    baseline: Optional[str]
    seed: int
    n_aux: int
    q_pattern: str
    d_pattern: str
    d_param: str
    learn: bool
    q_mask: list[list[int]]
    d_mask: list[list[int]]
    hyper: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    test_n_t: Optional[int] = None  # strata of the final evaluation, if not the spec's (confirmation trials)

    @property
    def n(self) -> int:
        return self.n_aux + 1

    @property
    def fixed_process(self) -> bool:
        """No entry of Q or D is trained: a baseline, or a learned structure frozen at its start."""
        return bool(self.baseline) or not self.learn

    def _hyper_at(self, section: str) -> dict:
        """The hyperparameters that land in one run-config section (their ``run_key``)."""
        return {dim.run_key[1]: self.hyper[dim.name] for dim in dimensions.hyper()
                if dim.run_key and dim.run_key[0] == section and self.hyper.get(dim.name) is not None}

    def process_config(self) -> dict:
        common = self._hyper_at("process")
        if self.baseline:
            return {"name": self.baseline, **common}
        return {"name": "learned", "n_aux": self.n_aux, "q_mask": self.q_mask, "d_mask": self.d_mask,
                "d_param": self.d_param, "learn": self.learn, **common}

    def model_config(self, spec: SearchSpec) -> dict:
        """The spec's model with this plan's noise predictor (parameterization, statistics)."""
        return {**spec.model.model_dump(mode="json"), **self._hyper_at("model")}

    def run_config(self, spec: SearchSpec) -> RunConfig:
        b = spec.budget
        data = {
            "process": self.process_config(),
            "data": spec.data.model_dump(mode="json"),
            "model": self.model_config(spec),
            "optim": {"batch_size": b.batch_size, **self._hyper_at("optim")},
            "train": {"steps": b.steps, "eval_every": b.eval_every, "eval_examples": b.eval_examples,
                      "eval_n_t": b.eval_n_t, "test_n_t": self.test_n_t or b.test_n_t, "t_min": b.t_min,
                      "seed": self.seed, "device": b.device, "devices": b.devices, "n_samples": b.n_samples,
                      "sample_steps": b.sample_steps, "progress": False,
                      "quality": b.quality.model_dump(mode="json") if b.quality else None, **self._hyper_at("train")},
        }
        return parse_run_config(data, f"trial plan for study {spec.study}")

    def check(self, spec: SearchSpec) -> StructureCheck:
        """Validity before any training: the structure (math note, section 6), then the
        initial process's kernels at t_min in float64."""
        cfg = self.run_config(spec)
        if self.baseline:
            proc = cfg.process.build()
            res = check_matrices(proc.Q, proc.D, proc.s_inf)
        else:
            qm = torch.tensor(self.q_mask, dtype=torch.bool)
            dm = torch.tensor(self.d_mask, dtype=torch.bool)
            res = check_structure(self.n, qm, dm, self.d_param)
            proc = cfg.process.build(self.seed) if res.valid else None
        return res if not res.valid else factorizable_at(proc, cfg.train.t_min)

    def config_hash(self, spec: SearchSpec, with_seed: bool = True) -> str:
        """Structure + hyperparameters + budget (+ seed): equal hashes with the seed train
        identically (dedupe key); without it they group the seeds of one configuration.

        Normalized first, so that aliases of one run share a hash: without auxiliary variables
        gamma (their initial variance) changes nothing, nor process_lr for a fixed process (a
        baseline, a frozen structure), and 'auto' is the predictor it resolves to."""
        process, hyper = self.process_config(), {}
        decided = {**self.hyper, "n_aux": self.n_aux, "fixed_process": self.fixed_process}
        for dim in dimensions.hyper():  # inert values are aliases: left out (from the process section too)
            if dim.inert(decided):
                if dim.run_key and dim.run_key[0] == "process":
                    process.pop(dim.run_key[1], None)
                continue
            value = self.hyper.get(dim.name)
            hyper[dim.name] = dim.canonical(value, decided) if value is not None else None
        key = {"process": process, "hyper": hyper,  # (what only evaluates or samples does not change the run)
               "budget": spec.budget.model_dump(mode="json", exclude=EVALUATION_ONLY),
               "data": spec.data.model_dump(mode="json"), "model": spec.model.model_dump(mode="json")}
        if with_seed:
            key["seed"] = self.seed
        return stable_hash(key)

    def structure_hash(self, spec: SearchSpec) -> str:
        """Hash of the process structure (family, masks, fixed constants), known before training."""
        return self.run_config(spec).process.build().structure_hash()

    def label(self) -> str:
        """The configuration's label, as the leaderboard and the report write it
        (:func:`mdmsearch.leaderboard.config_label`): structure, then the searched hyperparameters."""
        return config_label({"baseline": self.baseline, "n_aux": self.n_aux, "q_pattern": self.q_pattern,
                             "d_pattern": self.d_pattern, "d_param": self.d_param, "learn": self.learn,
                             "params": self.params})

    def nnz(self) -> tuple[int, int]:
        return int(sum(map(sum, self.q_mask))), int(sum(map(sum, self.d_mask)))


def baseline_params(spec: SearchSpec, seed: int) -> dict[str, Any]:
    """A baseline's default configuration and the seed: every searched hyperparameter at its
    default (fixed value, first choice or range midpoint).  The first of each baseline's grid
    (search/baselines.py, which enqueues the others too)."""
    params = {dim.name: dim.default(spec) for dim in dimensions.hyper() if dim.searched(spec)}
    if SEED.searched(spec):
        params[SEED.name] = seed
    return params


def _suggest_float(trial, name: str, r: FloatRange) -> float:
    if r.value is not None:
        return r.value
    if r.choices is not None:  # one choice is a fixed value, not a parameter (as for a list, below)
        return float(r.choices[0]) if len(r.choices) == 1 else float(trial.suggest_categorical(name, r.choices))
    return float(trial.suggest_float(name, r.low, r.high, log=r.log))


def _choice(trial, name: str, options: list):
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, options)


def ask(trial, dim: Dim, spec: SearchSpec):
    """A dimension's value for this trial: fixed, or suggested (a float range or a choice)."""
    opts = dim.options(spec)
    return _suggest_float(trial, dim.name, opts) if isinstance(opts, FloatRange) else _choice(trial, dim.name, list(opts))


def suggest_plan(trial, spec: SearchSpec, baseline: Optional[str] = None, seed: Optional[int] = None,
                 test_n_t: Optional[int] = None) -> TrialPlan:
    """Sample (or read back, for enqueued trials) a plan.  ``trial`` is any Optuna trial.
    ``seed``/``test_n_t``: a confirmation trial's fresh seed (not one of the spec's, so not a
    parameter) and final-evaluation strata."""
    hyper: dict[str, Any] = {}
    for dim in dimensions.hyper():  # in declaration order (a sampler's draws depend on it)
        hyper[dim.name] = ask(trial, dim, spec) if dim.active(hyper) else None
    seed = int(ask(trial, SEED, spec)) if seed is None else int(seed)
    if baseline:
        n_aux = baseline_n_aux(baseline)
        plan = TrialPlan(baseline, seed, n_aux, "fixed", "fixed", "fixed", False, [], [], hyper)
    else:
        plan = _suggest_structure(trial, spec, hyper, seed)
    plan.params = dict(trial.params)
    plan.test_n_t = test_n_t
    return plan


def baseline_n_aux(name: str) -> int:
    """A fixed process's number of auxiliary variables, from the process registry."""
    from ..diffusion.presets import preset

    return preset(name).n_aux


def _suggest_structure(trial, spec: SearchSpec, hyper: dict, seed: int) -> TrialPlan:
    s = spec.structure
    decided: dict[str, Any] = {}
    for dim in dimensions.structure():
        if dim.active(decided) and not (s.per_entry and dim.name in ("q_pattern", "d_pattern")):
            decided[dim.name] = ask(trial, dim, spec)
    n_aux, d_param, learn = int(decided["n_aux"]), decided["d_param"], bool(decided["learn"])
    n = n_aux + 1
    if n_aux == 0:
        # one variable: Q = 0 and D = [[d]] whatever the patterns say; suggesting patterns here
        # would only alias one structure under several names (and "aux" would be invalid)
        qp, dp = "none", "full"
        qm, dm = [[0]], [[1]]
    elif s.per_entry:
        qm = [[0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                qm[i][j] = int(trial.suggest_categorical(f"q_{i}{j}", [0, 1]))
        dm = [[0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1 if d_param == "full" else 0):
                if d_param == "full" or i == j:
                    dm[i][j] = int(trial.suggest_categorical(f"l_{i}{j}", [0, 1]))
            if d_param == "diag":
                dm[i][i] = int(trial.suggest_categorical(f"l_{i}{i}", [0, 1]))
        qp, dp = "per-entry", "per-entry"
    else:
        qp, dp = decided["q_pattern"], decided["d_pattern"]
        qm = q_pattern(qp, n).to(torch.int64).tolist()
        dmask = d_pattern(dp, n)
        if d_param == "diag":
            dmask = torch.diag(torch.diagonal(dmask))
        dm = dmask.to(torch.int64).tolist()
    return TrialPlan(None, seed, n_aux, qp, dp, d_param, learn, qm, dm, hyper)


def factorizable_at(process, t_min: float) -> StructureCheck:
    """Whether the transition covariances on [t_min, T] given x (and at t_min given (x, v0),
    for the truncation term) have a float64 Cholesky factor.  A controllable structure can still fail
    here: with noise entering only at the end of a chain of K = 3 auxiliaries, the x-variance
    given (x, v0) is O(B(t)^7), ~1e-28 at t = 1e-3, and the trial would die at its first step."""
    # a geometric grid over [t_min, T]: near the float64 limit, success at t_min alone is luck
    t = torch.logspace(math.log10(t_min), math.log10(process.T), 64, dtype=torch.float64)
    try:
        with torch.no_grad():
            process.kernel(t, given="x")  # training and validation times
            process.kernel(t[:1], given="xv")  # the truncation term
    except CholeskyError as exc:
        return StructureCheck(False, f"covariance on [t_min={t_min:g}, T] is not positive definite in float64 for the "
                                     f"initial Q, D (transition covariance is not positive definite {exc.where}); raise budget.t_min or free more "
                                     "entries of D")
    return StructureCheck(True)
