"""One typed, validated configuration for training a single diffusion, defaults in one place.

The CLI, the search and the benchmarks all build a :class:`RunConfig`; pydantic rejects
unknown keys and bad values with errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from .errors import ConfigError

MaskSpec = Union[str, list[list[int]], None]
MAX_AUX = 6  # the largest number of auxiliary variables, for run configs and search specs alike
# keys of a search spec that a run config never has (a spec given to `train` says so)
SPEC_ONLY_KEYS = ("study", "budget", "structure", "hyper", "sampler", "pruner", "objective", "baselines",
                  "seeds", "n_trials", "workers", "storage", "studies_dir", "resources", "executor")
LEARNED_ONLY = ("n_aux", "q_mask", "d_mask", "d_param", "learn", "q_init", "d_init", "init_noise")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _AddedLater(_Strict):
    """A section with fields added after configurations were first hashed and stored (search
    spec and trial hashes, checkpoints): such a field is left out of every dump (``model_dump``,
    ``model_dump_json``) while it has its default, so a configuration that does not use it dumps,
    hashes and compares with stored checkpoints exactly as before it existed."""

    ADDED_LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unused_additions(self, handler):
        data = handler(self)
        for name in self.ADDED_LATER:
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data


class ProcessConfig(_Strict):
    """A preset ("vpsde", "cld", "alda", "malda") or a "learned" structure."""

    name: str = "vpsde"
    n_aux: int = Field(1, ge=0, le=MAX_AUX, description="auxiliary variables K (learned only)")
    q_mask: MaskSpec = Field(None, description="pattern name or n x n 0/1 matrix; None = full")
    d_mask: MaskSpec = Field(None, description="pattern name or n x n 0/1 matrix; None = full")
    d_param: Literal["full", "diag"] = "full"
    learn: bool = Field(True, description="train Q and D jointly with the network (learned only)")
    q_init: float = -1.0
    d_init: float = Field(1.0, gt=0)
    init: Optional[str] = Field(None, description="start Q and D at this preset's matrices (same K), e.g. 'cld'")
    init_noise: float = Field(0.0, ge=0)
    schedule: Literal["linear", "constant"] = "linear"
    beta_0: float = Field(0.1, ge=0)
    beta_1: float = Field(10.0, gt=0)
    beta: Optional[float] = Field(None, gt=0, description="constant schedule's beta")
    gamma: float = Field(0.01, gt=0, description="variance of q(v0|x)")
    s_x2: float = Field(1.0, gt=0)
    s_v2: float = Field(1.0, gt=0)
    T: float = Field(1.0, gt=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .diffusion import available_processes

        v = v.lower()
        if v not in available_processes():
            raise ValueError(f"unknown process {v!r}; available: {available_processes()}")
        return v

    @model_validator(mode="after")
    def _init_matches(self):
        if self.init is None:
            return self
        from .diffusion.presets import fixed_processes, preset

        fixed = fixed_processes()
        if self.name != "learned":
            raise ValueError(f"init applies to learned processes only, not {self.name!r}")
        if self.init.lower() not in fixed:
            raise ValueError(f"init must be one of {fixed}, got {self.init!r}")
        k = preset(self.init).n - 1
        if k != self.n_aux:
            raise ValueError(f"init={self.init!r} has {k} auxiliary variable(s) but n_aux is {self.n_aux}")
        return self

    @model_validator(mode="after")
    def _learned_fields(self):
        """Learned-only keys on a fixed process are an error, not silently ignored; masks are
        checked against n = n_aux + 1 before any data is loaded."""
        if self.name != "learned":
            given = [f"{f}={getattr(self, f)!r}" for f in LEARNED_ONLY
                     if f in self.model_fields_set and getattr(self, f) != type(self).model_fields[f].default]
            if given:
                raise ValueError(f"{', '.join(given)}: only for learned processes; {self.name!r} is a fixed "
                                 "process (use name: learned to learn Q and D)")
            return self
        from .diffusion.structure import D_PATTERNS, Q_PATTERNS

        for key, known in (("q_mask", Q_PATTERNS), ("d_mask", D_PATTERNS)):
            _check_mask(key, getattr(self, key), self.n_aux + 1, known)
        return self

    def common(self) -> dict[str, Any]:
        out = dict(schedule=self.schedule, beta_0=self.beta_0, beta_1=self.beta_1, gamma=self.gamma,
                   s_x2=self.s_x2, s_v2=self.s_v2, T=self.T)
        if self.beta is not None:
            out["beta"] = self.beta
        return out

    def build(self, seed: int = 0):
        from .diffusion import learned, preset

        if self.name == "learned":
            proc = learned(self.n_aux, self.q_mask, self.d_mask, d_param=self.d_param, q_init=self.q_init,
                           d_init=self.d_init, init=self.init, init_noise=self.init_noise, seed=seed, **self.common())
            if not self.learn:
                proc.requires_grad_(False)
            return proc
        return preset(self.name, **self.common())


def _check_mask(key: str, mask: MaskSpec, n: int, patterns) -> None:
    if mask is None:
        return
    if isinstance(mask, str):
        if mask not in patterns:
            raise ValueError(f"{key}: unknown pattern {mask!r}; available: {sorted(patterns)} or an n x n 0/1 matrix")
        return
    shape = [len(row) for row in mask]
    if len(mask) != n or any(w != n for w in shape):
        raise ValueError(f"{key}: must be {n} x {n} (n = n_aux + 1), got rows of lengths {shape}")
    if any(v not in (0, 1) for row in mask for v in row):
        raise ValueError(f"{key}: entries must be 0 or 1")


class DataConfig(_Strict):
    name: str = "digits"
    data_dir: Optional[str] = None
    seed: int = 0
    n_train: Optional[int] = Field(None, gt=0)
    n_val: Optional[int] = Field(None, gt=0)
    n_test: Optional[int] = Field(None, gt=0)
    download: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific options, e.g. dim for gaussian")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .data import available_datasets

        v = v.lower()
        if v not in available_datasets():
            raise ValueError(f"unknown dataset {v!r}; available: {available_datasets()}")
        return v


class ModelConfig(_AddedLater):
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("precision",)

    name: str = Field("auto", description="'auto' = mlp for vectors, unet for images")
    size: str = "tiny"
    # auto: on MNIST (600 steps) the residual costs VPSDE +0.054 bpd [-0.047, +0.154] (a tie over 3 seeds) while
    # it removes the auxiliary tax of the MDMs on digits and MNIST (docs/benchmarks.md, learned vs fixed);
    # on digits mixed also helps K = 0 (VPSDE -0.031 [-0.060, -0.003])
    parameterization: Literal["auto", "eps", "mixed"] = Field(
        "auto", description="'mixed': eps_hat = exact Gaussian-data noise prediction + network; 'eps': network "
                             "alone; 'auto': mixed with auxiliary variables, eps without (K = 0)")
    # global: never decided worse than floored on digits (8 entries) or MNIST (K >= 1), every difference a tie
    # over 3 seeds, CLD's point estimates in its favour (-0.022 / -0.092 bpd); docs/benchmarks.md
    residual_stats: Literal["pixel", "floored", "global"] = Field(
        "global", description="data statistics of the Gaussian part (mixed only): per coordinate, per coordinate "
                               "with variances floored at 0.1x the global one, or one global mean and variance")
    options: dict[str, Any] = Field(default_factory=dict, description="overrides of the size preset")
    # the network's arithmetic only: process matrices, the Gaussian part and the ELBO stay float64/float32
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the score network's forward pass under autocast: fp32 (none), bf16, or fp16 (with a "
                            "gradient scaler); training and evaluation alike")


class OptimConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    process_lr: float = Field(1e-2, ge=0, description="learning rate of Q and D")
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema: float = Field(0.999, ge=0, lt=1)


BUILTIN_FEATURES = ("auto", "classifier", "inception")  # mdmsearch.quality.features registers these


class QualityConfig(_Strict):
    """Sample quality at the end of a run (see docs/quality.md): ``n`` samples drawn with
    ``sampler`` at ``nfe`` network evaluations from noise seeded with ``seed`` (the same noise for
    every run: common random numbers), scored by KID and FID against the training split in the
    feature space ``features`` (auto: the dataset's own classifier for 1 channel, Inception for 3)."""

    n: int = Field(256, gt=1, description="samples scored")
    sampler: Literal["em", "ode"] = "em"
    nfe: int = Field(100, gt=0, description="network evaluations per sample (em: one per step; ode, RK4: four)")
    seed: int = 2024
    features: str = "auto"

    @field_validator("features")
    @classmethod
    def _known_features(cls, v: str) -> str:
        if v in BUILTIN_FEATURES:  # (the registry imports torch: asked only for another name)
            return v
        from .quality.features import EXTRACTORS

        if v not in EXTRACTORS:
            raise ValueError(f"unknown features {v!r}; available: {', '.join(sorted(EXTRACTORS))}")
        return v


STREAMS = ("init", "data", "diffusion")  # the named seed streams of a run (docs/training.md)


class SeedStreams(_Strict):
    """Seeds of a run's random streams, each ``train.seed`` when not given: ``init`` the network's
    initial weights (layer by layer) and a learned process's initial noise, ``data`` the order of
    the batches and their dequantization, ``diffusion`` the times and the noise of the forward
    process.  (The evaluation stream is ``train.eval_seed``, shared by every run.)"""

    init: Optional[int] = None
    data: Optional[int] = None
    diffusion: Optional[int] = None


class TrainConfig(_AddedLater):
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("devices", "quality", "streams", "seeds")

    steps: int = Field(1000, gt=0)
    eval_every: int = Field(200, gt=0)
    eval_examples: int = Field(512, gt=0, description="validation examples per evaluation")
    eval_batch_size: int = Field(256, gt=0)
    # One t per example leaves a Monte Carlo error of several bpd per example (CLD on digits:
    # ~4.7 bpd, i.e. 0.3 bpd on the mean of 270 examples); stratified t-samples cut it.
    eval_n_t: int = Field(8, gt=0, description="stratified time samples per example in validation")
    test_n_t: int = Field(32, gt=0, description="stratified time samples per example in the final evaluation of the "
                                                "validation and test splits (the one runs are ranked and paired by)")
    time_sampler: Literal["uniform", "vp", "adaptive"] = "vp"
    adaptive_refresh: int = Field(100, gt=0, description="steps between re-tabulations of the adaptive p(t)")
    t_min: float = Field(1e-3, gt=0, lt=1)
    seed: int = 0
    # common random numbers: with "crn", runs of the same seeds draw the same batches, times, data noise and
    # initial weights of the layers their structures share, whatever K; "shared" is the one stream of earlier
    # versions (a run of it is the run those versions trained, bit for bit)
    streams: Literal["crn", "shared"] = Field(
        "crn", description="how the seeds become random streams: 'crn' named streams shared across structures, "
                           "'shared' one stream for dequantization, times and noise (earlier versions)")
    seeds: Optional[SeedStreams] = Field(None, description="seeds of the init, data and diffusion streams set apart "
                                                           "(each defaults to train.seed; streams crn only)")
    eval_seed: int = 12345
    device: str = "auto"
    n_samples: int = Field(64, ge=0, description="samples drawn into the grid at the end (0 = none)")
    sample_steps: int = Field(200, gt=0)
    progress: bool = True
    quality: Optional[QualityConfig] = Field(None, description="sample quality (KID, FID) at the end; None = not measured")
    devices: int = Field(1, gt=0, description="processes that train this one run data-parallel (CPU: one per share of "
                                              "the cores; CUDA: one per GPU, cuda:0 .. cuda:N-1); optim.batch_size "
                                              "is the global batch, split evenly between them")

    @model_validator(mode="after")
    def _streams_apart(self):
        if self.seeds is not None and self.streams != "crn":
            raise ValueError("train.seeds sets streams apart: it needs train.streams crn (with 'shared' one stream "
                             "draws the dequantization, times and noise)")
        return self

    def stream_seed(self, stream: str) -> int:
        """The seed of ``stream`` (one of :data:`STREAMS`): ``seeds.<stream>``, else ``seed``."""
        if stream not in STREAMS:
            raise ValueError(f"unknown seed stream {stream!r}; streams: {', '.join(STREAMS)}")
        given = getattr(self.seeds, stream) if self.seeds is not None else None
        return self.seed if given is None else given


class RunConfig(_Strict):
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _consistent(self):
        if self.train.eval_every > self.train.steps:
            self.train.eval_every = self.train.steps
        return self

    @model_validator(mode="after")
    def _batches_split(self):
        """Every process takes an equal share of the global batch and of each evaluation batch."""
        n = self.train.devices
        if self.optim.batch_size % n:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} is not divisible by train.devices {n} "
                             "(the global batch is split evenly between the processes)")
        if self.train.eval_batch_size < n:
            raise ValueError(f"train.eval_batch_size {self.train.eval_batch_size} is smaller than train.devices {n}")
        return self


def format_validation_error(exc: ValidationError, source: str = "config",
                            flags: Optional[dict[tuple, str]] = None) -> str:
    """One line; an error in a value that came from a flag names the flag (``flags`` maps a
    location such as ("train", "steps") to "--steps 5")."""
    parts, flag_parts = [], []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        flag = _flag_of(loc, msg, flags or {})
        if flag:
            flag_parts.append(f"{flag}: {msg}")
        else:
            parts.append(f"{'.'.join(str(p) for p in loc) or '<root>'}: {msg}")
    if flag_parts:
        return "; ".join(flag_parts + parts)
    return f"{source}: " + "; ".join(parts)


def _flag_of(loc: tuple, msg: str, flags: dict[tuple, str]) -> str:
    """The flag that set the value at ``loc``; for a section-level check the flags that set its
    keys; for a check across sections (``loc`` empty) the flags whose keys its message names."""
    if loc in flags:
        return f"{flags[loc]} ({'.'.join(str(p) for p in loc)})"
    if loc:
        return " ".join(f for k, f in flags.items() if k[:len(loc)] == loc)
    return " ".join(f"{f} ({'.'.join(k)})" for k, f in flags.items() if ".".join(k) in msg)


def load_yaml(path: str | Path) -> dict:
    """A run config file: one mapping, no duplicate keys, not empty, not a search spec."""
    from .yamlio import load_text, read_text

    data, _ = load_text(read_text(path, "run config"), str(path), "run config")
    spec_keys = [k for k in SPEC_ONLY_KEYS if k in data]
    if spec_keys:
        raise ConfigError(f"{path}: this is a search spec (keys {', '.join(spec_keys[:4])}), not a run config; "
                          f"run it with `mdmsearch run {path}`")
    return data


def resolve_parameterization(name: str, n_aux: int) -> str:
    """The noise predictor a run uses: 'auto' is 'mixed' for processes with auxiliary variables
    (whose Gaussian part the network would otherwise relearn) and 'eps' for K = 0."""
    if name == "auto":
        return "mixed" if n_aux > 0 else "eps"
    return name


def upgrade_saved_config(data: dict) -> dict:
    """A configuration saved by an older version, read as what it trained: checkpoints written
    before the Gaussian-residual parameterization existed are ``eps`` (copy)."""
    data = dict(data)
    model = dict(data.get("model") or {})
    if "parameterization" not in model:
        model["parameterization"] = "eps"
        model.setdefault("residual_stats", ModelConfig.model_fields["residual_stats"].default)
    data["model"] = model
    return data


def parse_run_config(data: dict, source: str = "config", flags: Optional[dict[tuple, str]] = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, flags)) from None


def load_run_config(path: str | Path) -> RunConfig:
    return parse_run_config(load_yaml(path), str(path))
