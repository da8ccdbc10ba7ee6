"""The search-space spec (YAML), validated with pydantic: errors name the key and its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import DataConfig, ModelConfig
from ..diffusion.structure import D_PATTERNS, Q_PATTERNS, stable_hash
from ..errors import ConfigError

BASELINES = ("vpsde", "cld", "alda", "malda")
MAX_AUX = 6


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
    parameterization: Optional[list[Literal["eps", "mixed"]]] = Field(
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
    test_n_t: int = Field(32, gt=0, description="stratified time samples per test example (final evaluation)")
    batch_size: int = Field(64, gt=0)
    t_min: float = Field(1e-3, gt=0, lt=1)
    n_samples: int = Field(64, ge=0)
    sample_steps: int = Field(100, gt=0)
    device: str = "auto"
    threads: int = Field(1, gt=0, description="torch CPU threads per worker")


class Objective(_Strict):
    metric: Literal["val_bpd"] = "val_bpd"
    second: Optional[Literal["train_seconds", "n_params"]] = None


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "grid", "gp", "nsga2"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(6, ge=0)


class PrunerSpec(_Strict):
    name: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


class SearchSpec(_Strict):
    study: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    budget: Budget = Field(default_factory=Budget)
    objective: Objective = Field(default_factory=Objective)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    structure: StructureSpace = Field(default_factory=StructureSpace)
    hyper: HyperSpace = Field(default_factory=HyperSpace)
    baselines: list[str] = Field(default_factory=lambda: list(BASELINES))
    seeds: list[int] = Field(default_factory=lambda: [0], description="training seeds; each config runs once per seed")
    n_trials: int = Field(20, gt=0)
    workers: int = Field(1, gt=0)
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop asking new trials after this many seconds")
    storage: Optional[str] = Field(None, description="Optuna storage URL; default: journal file under studies/<study>/")
    studies_dir: str = "studies"
    leaderboard_dir: Optional[str] = Field(None, description="default: <studies_dir>/leaderboard")
    resources: dict[str, float] = Field(default_factory=lambda: {"cpu": 1, "gpu": 0}, description="per-trial resources (Ray)")
    executor: Literal["local", "ray"] = "local"

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
        """The part of the spec that defines the study's search space (hashed and stored)."""
        keep = self.model_dump(mode="json", exclude={"n_trials", "workers", "storage", "studies_dir",
                                                       "leaderboard_dir", "executor", "resources",
                                                       "time_budget_s"})
        keep["budget"].pop("device", None)
        keep["budget"].pop("threads", None)
        return keep

    def spec_hash(self) -> str:
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
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        mapping[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = key_node.start_mark.line + 1
    loader._mdm_lines[id(mapping)] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_with_lines(text: str, source: str) -> tuple[dict, dict]:
    loader = _LineLoader(text)
    loader._mdm_lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{source}:{where} invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{source}: empty spec")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return data, loader._mdm_lines


def _line_of(data: dict, lines: dict, loc: tuple) -> Optional[int]:
    node, line = data, None
    for part in loc:
        if isinstance(node, dict) and part in node:
            line = lines.get(id(node), {}).get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line


def parse_spec(data: dict, source: str = "spec", lines: Optional[dict] = None) -> SearchSpec:
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            key = ".".join(str(p) for p in loc) or "<root>"
            line = _line_of(data, lines or {}, loc)
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")
            parts.append(f"{key}{f' (line {line})' if line else ''}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def load_spec(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> SearchSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    data, lines = _load_with_lines(path.read_text(), str(path))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "dataset":
            data.setdefault("data", {})
            if not isinstance(data["data"], dict):
                raise ConfigError(f"{path}: data must be a mapping")
            data["data"]["name"] = value
        else:
            data[key] = value
    return parse_spec(data, str(path), lines)


def spec_summary(spec: SearchSpec) -> str:
    return json.dumps(spec.normalized(), sort_keys=True)
