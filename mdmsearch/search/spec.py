"""The search-space spec (YAML), validated with pydantic: errors name the key and its line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import MAX_AUX, DataConfig, ModelConfig, QualityConfig
from ..errors import ConfigError
from ..yamlio import line_of, load_text, read_text

BASELINES = ("vpsde", "cld", "alda", "malda")
RESOURCE_KEYS = ("cpu", "gpu")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatRange(_Strict):
    """A float hyperparameter: a fixed value, a range (low/high, log), or choices."""

    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[list[float]] = None
    value: Optional[float] = None

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = sum(x is not None for x in (self.value, self.choices, self.low))
        if kinds != 1:
            raise ValueError("give exactly one of: value, choices, or low/high")
        if self.low is not None:
            if self.high is None or not self.high > self.low:
                raise ValueError("needs high > low")
            if self.log and self.low <= 0:
                raise ValueError("log range needs low > 0")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must not be empty")
        return self


def _float_range(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"value": float(v)}
    if isinstance(v, list):
        return {"choices": v}
    return v


class StructureSpace(_Strict):
    n_aux: list[int] = Field(default_factory=lambda: [1, 2, 3], description="choices of K")
    q_patterns: list[str] = Field(default_factory=lambda: ["full", "chain"])
    d_patterns: list[str] = Field(default_factory=lambda: ["full", "diag", "aux", "last"])
    d_param: list[Literal["full", "diag"]] = Field(default_factory=lambda: ["full"])
    per_entry: bool = Field(False, description="search each free entry of U and L on/off instead of patterns")
    learn: list[bool] = Field(default_factory=lambda: [True], description="learn Q, D (True) or keep the init (False)")

    @field_validator("n_aux")
    @classmethod
    def _aux(cls, v):
        if not v:
            raise ValueError("must list at least one number of auxiliary variables")
        bad = [k for k in v if not 0 <= k <= MAX_AUX]
        if bad:
            raise ValueError(f"n_aux values must be in 0..{MAX_AUX}, got {bad}")
        return sorted(set(v))

    @field_validator("q_patterns", "d_patterns")
    @classmethod
    def _patterns(cls, v, info):
        from ..diffusion.structure import D_PATTERNS, Q_PATTERNS  # torch: only when patterns are given

        which, known = ("Q", Q_PATTERNS) if info.field_name == "q_patterns" else ("D", D_PATTERNS)
        if not v:
            raise ValueError("must not be empty")
        bad = [p for p in v if p not in known]
        if bad:
            raise ValueError(f"unknown {which} pattern(s) {bad}; available: {sorted(known)}")
        return v


class HyperSpace(_Strict):
    lr: FloatRange = Field(default_factory=lambda: FloatRange(value=2e-3))
    process_lr: FloatRange = Field(default_factory=lambda: FloatRange(value=1e-2))
    gamma: FloatRange = Field(default_factory=lambda: FloatRange(value=0.01))
    beta_1: FloatRange = Field(default_factory=lambda: FloatRange(value=10.0))
    time_sampler: list[Literal["uniform", "vp", "adaptive"]] = Field(default_factory=lambda: ["vp"])
    parameterization: Optional[list[Literal["auto", "eps", "mixed"]]] = Field(
        None, min_length=1, description="noise predictors to search; default: model.parameterization alone")
    residual_stats: Optional[list[Literal["pixel", "floored", "global"]]] = Field(
        None, min_length=1, description="Gaussian-part statistics to search (mixed only); default: model.residual_stats")

    @field_validator("lr", "process_lr", "gamma", "beta_1", mode="before")
    @classmethod
    def _coerce(cls, v):
        return _float_range(v)


class Budget(_Strict):
    steps: int = Field(400, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_examples: int = Field(270, gt=0)
    eval_n_t: int = Field(8, gt=0, description="stratified time samples per validation example (the objective's noise)")
    test_n_t: int = Field(32, gt=0, description="stratified time samples per example in the final evaluation of the "
                                                "validation and test splits (ranking, paired comparisons)")
    batch_size: int = Field(64, gt=0)
    t_min: float = Field(1e-3, gt=0, lt=1)
    n_samples: int = Field(64, ge=0)
    sample_steps: int = Field(100, gt=0)
    device: str = "auto"
    threads: int = Field(1, gt=0, description="torch CPU threads per worker")
    devices: int = Field(1, gt=0, description="processes that train one trial together, data parallel (train.devices:"
                                              " one GPU each on CUDA); the same run up to the order of float sums")
    quality: Optional[QualityConfig] = Field(default_factory=QualityConfig,
                                             description="sample quality (KID, FID) of every completed trial at a fixed "
                                                         "NFE (docs/quality.md); null = not measured")


class Objective(_Strict):
    metric: Literal["val_bpd"] = "val_bpd"
    second: Optional[Literal["train_seconds", "n_params", "kid"]] = None


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "grid", "gp", "nsga2"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(6, ge=0, description="random searched trials before TPE/GP model the results, "
                                                       "counted after the enqueued baseline runs")


class PrunerSpec(_Strict):
    name: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


class ConfirmSpec(_Strict):
    """Intensification: once the search has its ``n_trials``, the incumbent (the best searched
    configuration by validation BPD), the best baseline and the next best ``top_k - 1`` searched
    configurations are trained again on fresh seeds, one round (one seed each) at a time, as
    ordinary trials of the same study, until the winner's structure verdict against the
    baseline is decided on the validation split or ``seeds`` rounds are done.  Looks from
    ``min_seeds`` on, each at its level of an alpha-spending schedule (search/race.py): an early
    stop needs p < 0.001, the last look tests at the rest of 0.04.  A challenger decided worse
    than the incumbent drops out for good; one decided better is confirmed on new seeds."""

    seeds: int = Field(0, ge=0, le=64, description="fresh seeds at most per confirmed configuration (0: no confirmation)")
    min_seeds: int = Field(2, ge=2, le=64, description="rounds before a decided verdict may end the confirmation")
    top_k: int = Field(2, ge=1, le=10, description="searched configurations confirmed: the incumbent and the next best")
    seed_start: int = Field(1000, ge=0, description="the fresh seeds are seed_start, seed_start + 1, ...")
    test_n_t: Optional[int] = Field(None, gt=0, description="strata of a confirmation trial's final evaluation "
                                                            "(default: budget.test_n_t); search trials use budget.test_n_t")

    @model_validator(mode="after")
    def _rounds(self):
        if self.seeds and self.min_seeds > self.seeds:
            raise ValueError(f"min_seeds ({self.min_seeds}) must not exceed seeds ({self.seeds})")
        return self


class SearchSpec(_Strict):
    study: str = Field(..., description="study name: letters, digits, _ . -")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    budget: Budget = Field(default_factory=Budget)
    objective: Objective = Field(default_factory=Objective)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    structure: StructureSpace = Field(default_factory=StructureSpace)
    hyper: HyperSpace = Field(default_factory=HyperSpace)
    baselines: list[str] = Field(default_factory=lambda: list(BASELINES))
    baseline_configs: int = Field(8, ge=1, description="hyperparameter configurations per baseline at most: the grid "
                                                       "of its applicable searched hyperparameters (search/baselines.py)"
                                                       "; 1: every one at its default")
    seeds: list[int] = Field(default_factory=lambda: [0], description="training seeds; each config runs once per seed")
    n_trials: int = Field(20, gt=0)
    workers: int = Field(1, gt=0)
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop asking new trials after this many seconds")
    storage: Optional[str] = Field(None, description="Optuna storage URL; default: journal file under studies/<study>/")
    studies_dir: str = "studies"
    leaderboard_dir: Optional[str] = Field(None, description="default: <studies_dir>/leaderboard")
    resources: dict[str, float] = Field(default_factory=lambda: {"cpu": 1},
                                        description="per-trial resources (Ray); gpu unset: from budget.device "
                                                    "(mdmsearch/search/gpus.py), a fraction < 1 shares a GPU")
    executor: Literal["local", "ray"] = "local"
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)

    @model_validator(mode="after")
    def _kid_is_measured(self):
        if self.objective.second == "kid" and self.budget.quality is None:
            raise ValueError("objective.second: kid needs budget.quality (it is how the KID is measured)")
        return self

    @field_validator("study")
    @classmethod
    def _study_name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v) or v in (".", ".."):
            raise ValueError(f"study name {v!r} may only use letters, digits, '_', '.' and '-' (it names a directory)")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v):
        bad = sorted(set(v) - set(RESOURCE_KEYS))
        if bad:
            raise ValueError(f"unknown resource key(s) {bad}; allowed: {', '.join(RESOURCE_KEYS)}")
        neg = {k: x for k, x in v.items() if x < 0}
        if neg:
            raise ValueError(f"resources must be >= 0, got {neg}")
        gpu = v.get("gpu", 0)
        if gpu > 1 and gpu != round(gpu):
            raise ValueError(f"resources.gpu {gpu:g}: Ray takes a fraction below 1 (GPUs shared) or a whole number")
        return v

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v):
        bad = [b for b in v if b.lower() not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}; available: {list(BASELINES)}")
        return [b.lower() for b in v]

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ValueError("must list at least one seed")
        return v

    def normalized(self) -> dict:
        """The part of the spec that defines the study's search space (hashed and stored).  Budgets
        are left out: n_trials, and baseline_configs (read once, when the study enqueues its baselines)."""
        keep = self.model_dump(mode="json", exclude={"n_trials", "workers", "storage", "studies_dir",
                                                       "leaderboard_dir", "executor", "resources",
                                                       "time_budget_s", "confirm", "baseline_configs"})
        for where_it_runs in ("device", "threads", "devices"):  # not the space: the same runs up to float order
            keep["budget"].pop(where_it_runs, None)
        if self.objective.second != "kid":  # a measurement of every trial, not what the search optimizes
            keep["budget"].pop("quality", None)
        return keep

    def spec_hash(self) -> str:
        from ..diffusion.structure import stable_hash

        return stable_hash(self.normalized())

    @property
    def study_dir(self) -> Path:
        return Path(self.studies_dir) / self.study

    @property
    def leaderboard_root(self) -> Path:
        return Path(self.leaderboard_dir) if self.leaderboard_dir else Path(self.studies_dir) / "leaderboard"

    @property
    def curves_root(self) -> Path:
        return self.leaderboard_root.parent / (self.leaderboard_root.name + "-curves")


# ---------------------------------------------------------------------- loading
# override key -> (the flag that sets it, the spec location it lands in)
FLAGS = {"n_trials": ("--n-trials", ("n_trials",)), "workers": ("--workers", ("workers",)),
         "storage": ("--storage", ("storage",)), "dataset": ("--dataset", ("data", "name")),
         "studies_dir": ("--studies-dir", ("studies_dir",)), "executor": ("--executor", ("executor",)),
         "time_budget_s": ("--time-budget", ("time_budget_s",))}
RUN_CONFIG_ONLY = ("process", "optim", "train")  # top-level keys of a run config, never of a spec


def _where(loc: tuple, data: dict, lines: dict, flags: dict) -> str:
    """``key (line N)`` for a value from the YAML, ``--flag VALUE`` for one from a flag."""
    for flag_loc, (flag, value) in flags.items():
        if loc[:len(flag_loc)] == flag_loc:
            return f"{flag} {value} ({'.'.join(str(p) for p in loc)})"
    key = ".".join(str(p) for p in loc) or "<root>"
    line = line_of(data, lines, loc)
    return f"{key}{f' (line {line})' if line else ''}"


def parse_spec(data: dict, source: str = "spec", lines: Optional[dict] = None,
               flags: Optional[dict] = None) -> SearchSpec:
    """Validate a spec mapping; ``flags`` maps a location to the (flag, value) that set it."""
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as exc:
        parts, flag_parts = [], []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            where = _where(loc, data, lines or {}, flags or {})
            (flag_parts if where.startswith("--") else parts).append(f"{where}: {msg.removeprefix('Value error, ')}")
        if flag_parts:  # a bad flag is the user's latest typing: report it first, without the file
            raise ConfigError("; ".join(flag_parts + parts)) from None
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def check_spec_kind(data: dict, source: str) -> None:
    """A run config given to ``run`` says so instead of listing unknown keys."""
    run_keys = [k for k in RUN_CONFIG_ONLY if k in data]
    if run_keys and "study" not in data:
        raise ConfigError(f"{source}: this is a run config (keys {', '.join(run_keys)}), not a search spec; "
                          f"train it with `mdmsearch train {source} --out DIR`")


def load_spec(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> SearchSpec:
    text = read_text(path, "spec file")
    data, lines = load_text(text, str(path), "spec")
    check_spec_kind(data, str(path))
    flags = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        flag, loc = FLAGS.get(key, ("--" + key.replace("_", "-"), (key,)))
        flags[loc] = (flag, value)
        if key == "dataset":
            if not isinstance(data.setdefault("data", {}), dict):
                raise ConfigError(f"{path}: data must be a mapping")
            data["data"]["name"] = value
        else:
            data[key] = value
    return parse_spec(data, str(path), lines, flags)


def spec_summary(spec: SearchSpec) -> str:
    return json.dumps(spec.normalized(), sort_keys=True)
