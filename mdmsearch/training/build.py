"""Building a run's pieces from its configuration: ``build_parts(config, data) -> Parts``.

Data, process, network, noise predictor (the network alone, or the exact Gaussian part plus
the network; under autocast for ``model.precision`` bf16/fp16), the training and evaluation
time samplers, the optimizer over the network and process parameter groups, the warm-up
schedule, the EMA, the random generators (:mod:`.streams`) and the fp16 loss scaler.

With ``train.streams: crn`` (the default) the network's initial weights are drawn layer by layer
from streams named by the layer (:func:`~mdmsearch.nets.init_by_name`, from the init seed) and
every other draw from its own named generator (:mod:`.streams`).  With ``shared`` (earlier
versions) the order of construction is part of the result: the network's initialization draws
from torch's global generator, seeded with ``train.seed`` before anything else is built, so a
run is the same run whoever builds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import RunConfig, resolve_parameterization
from ..data import DataBundle, load_from_config
from ..errors import ConfigError
from ..diffusion.process import LinearMDM
from ..nets import build_network, count_parameters, init_by_name, named_seed
from ..objectives import make_time_sampler
from ..objectives.residual import GaussianStats, ResidualEps, residual_stats
from ..objectives.time_sampling import TimeSampler
from .ema import EMA
from .evaluate import data_moments
from .precision import autocast_network, make_scaler
from .streams import Streams, make_streams

__all__ = ["Parts", "build_parts", "resolve_device", "configure_cuda", "CUDA_DEFAULTS", "network_name", "make_optimizer",
           "make_scheduler",
           "param_groups", "residual_statistics"]

# devices with fused Adam kernels: one kernel for all parameters
_FUSED_ADAM_DEVICES = ("cpu", "cuda")


@dataclass
class Parts:
    """Everything a run trains and evaluates with, before its first step."""

    device: torch.device
    data: DataBundle
    train_x: torch.Tensor  # [N_train, *shape] on the device
    process: LinearMDM
    net: torch.nn.Module
    parameterization: str  # "eps" or "mixed"
    model: Callable  # the noise predictor the ELBO, evaluation and samplers see: net or ResidualEps(net),
    # with the network under autocast for model.precision bf16/fp16 (net itself stays the float32 module)
    time_sampler: TimeSampler  # t in training
    eval_sampler: TimeSampler  # t in evaluation
    process_params: list[torch.nn.Parameter]  # the learned entries of Q and D (none for a fixed process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA  # of network and process parameters: the weights a run reports
    data_gen: torch.Generator  # batch indices (CPU)
    noise_gen: torch.Generator  # crn: eps of the data coordinate; shared: t, eps, dequantization (device)
    deq_gen: Optional[torch.Generator]  # crn: dequantization (device); shared: None (noise_gen)
    time_gen: Optional[torch.Generator]  # crn: the uniforms behind t (device); shared: None (noise_gen)
    aux_gen: Optional[torch.Generator]  # crn: eps of the auxiliary coordinates (device); shared: None (noise_gen)
    n_params: int  # network parameters
    scaler: Optional[torch.amp.GradScaler]  # loss scaling of fp16 training (None for fp32, bf16)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch names it.  A GPU that this
    process cannot see is one line (a ConfigError), not a CUDA traceback at the first copy."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device {name!r} is not a device torch knows ({str(exc).splitlines()[0]})") from None
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0 or (device.index or 0) >= visible:
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"train.device {name!r}: this process sees {visible} CUDA GPU(s)"
                              f"{'' if mask is None else f' (CUDA_VISIBLE_DEVICES={mask!r})'}; use cpu or auto")
    return device


# what a run on CUDA sets in torch's backends (environment variables override; docs/training.md):
#   cudnn.benchmark: pick the fastest convolution algorithm per input shape (a run has two or three
#     shapes; the first step of each is slower).  Results differ from another algorithm's in rounding.
#   TF32 matmuls: off.  They would also round the ELBO's float32 products of the data (10-bit
#     mantissas: ~1e-3 relative), i.e. the likelihood a run reports; convolutions in TF32 are
#     torch's own default (cudnn.allow_tf32) and stay so: they touch the network only.
CUDA_DEFAULTS = {"MDMSEARCH_CUDNN_BENCHMARK": "1", "MDMSEARCH_TF32_MATMUL": "0"}


def configure_cuda() -> dict[str, bool]:
    """Set cudnn.benchmark and TF32 matmuls from :data:`CUDA_DEFAULTS` or the environment; returns
    what was set.  Called when a run is built on CUDA (global to the process, as torch's flags are)."""
    def flag(key: str) -> bool:
        raw = os.environ.get(key, CUDA_DEFAULTS[key]).strip().lower()
        if raw not in ("0", "1", "true", "false"):
            raise ConfigError(f"${key} must be 0 or 1, got {raw!r}")
        return raw in ("1", "true")

    bench, tf32 = flag("MDMSEARCH_CUDNN_BENCHMARK"), flag("MDMSEARCH_TF32_MATMUL")
    torch.backends.cudnn.benchmark = bench
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"cudnn_benchmark": bench, "tf32_matmul": tf32}


def network_name(config: RunConfig, data_shape: tuple[int, ...]) -> str:
    """The configured network, or for ``auto`` an MLP for vectors and a U-Net for images."""
    if config.model.name != "auto":
        return config.model.name
    return "mlp" if len(data_shape) == 1 else "unet"


def make_optimizer(groups: list[dict], weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay) over parameter groups, with the fastest implementation
    the device has: fused on CPU and CUDA, multi-tensor (foreach) elsewhere.  Fused vs foreach
    on CPU, measured in whole training steps (tiny U-Net, digits, batch 64): 24.0 -> 22.8 ms
    (VPSDE), 26.9 -> 25.6 ms (learned K = 3); at MNIST size the optimizer is lost in the
    network's time.  The default on CPU, a Python loop over parameters, is slower than both."""
    adam = torch.optim.Adam if weight_decay == 0 else torch.optim.AdamW
    if device.type in _FUSED_ADAM_DEVICES:
        return adam(groups, fused=True)
    return adam(groups, foreach=True)


def param_groups(config: RunConfig, net: torch.nn.Module, process_params: list[torch.nn.Parameter]) -> list[dict]:
    """The network group (``optim.lr``, weight decay) and, for a learned process with
    ``optim.process_lr > 0``, the process group (its own rate, no weight decay)."""
    groups = [{"params": list(net.parameters()), "lr": config.optim.lr, "weight_decay": config.optim.weight_decay}]
    if process_params and config.optim.process_lr > 0:
        groups.append({"params": process_params, "lr": config.optim.process_lr, "weight_decay": 0.0})
    return groups


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up of every group's rate over ``warmup`` steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)


def residual_statistics(config: RunConfig, data: DataBundle) -> GaussianStats:
    """mu, s2 per coordinate of the training split in model space (dequantized with a fixed
    seed, logit-transformed), reduced to ``model.residual_stats``."""
    gen = torch.Generator().manual_seed(_residual_seed(config))
    mean, var = data_moments(data.train, data.levels, gen)
    return GaussianStats(*residual_stats(mean, var, config.model.residual_stats), kind=config.model.residual_stats)


def _residual_seed(config: RunConfig) -> int:
    """The seed of the dequantization behind the Gaussian part's statistics: the data stream's."""
    tc = config.train
    return named_seed(tc.stream_seed("data"), "residual_stats") if tc.streams == "crn" else tc.seed + 3


def _build_model(config: RunConfig, data: DataBundle, process: LinearMDM,
                 device: torch.device) -> tuple[torch.nn.Module, str, Callable]:
    """(network, parameterization, noise predictor): the network, or the exact Gaussian-data
    prediction plus the network (statistics of the training split, fixed) for ``mixed``; the
    predictor calls the network under autocast for ``model.precision`` bf16 / fp16."""
    net = build_network(network_name(config, data.shape), n_vars=process.n, data_shape=tuple(data.shape),
                        size=config.model.size, **config.model.options)
    if config.train.streams == "crn":  # layers shared across structures start alike (common random numbers)
        init_by_name(net, config.train.stream_seed("init"))
    net = net.to(device)
    parameterization = resolve_parameterization(config.model.parameterization, process.n_aux)
    called = autocast_network(net, config.model.precision, device)  # net itself for fp32
    model = (ResidualEps(called, residual_statistics(config, data)).to(device)
             if parameterization == "mixed" else called)
    return net, parameterization, model


def build_parts(config: RunConfig, data: Optional[DataBundle] = None, device: Optional[torch.device] = None) -> Parts:
    """A run's pieces in a fixed order (seeds first); ``data`` defaults to the dataset the
    configuration names, ``device`` to ``train.device`` resolved (a data-parallel process
    passes its own).  Raises for a process structure that cannot be valid (no training)."""
    tc = config.train
    device = device if device is not None else resolve_device(tc.device)
    if device.type == "cuda":
        configure_cuda()
    streams: Streams = make_streams(tc, device)
    torch.manual_seed(tc.stream_seed("init"))  # (shared: train.seed; the network's init draws from it)
    data = data if data is not None else load_from_config(config.data)
    process: LinearMDM = config.process.build(seed=tc.stream_seed("init")).to(device)
    process.validate()  # invalid structures cost no training
    net, parameterization, model = _build_model(config, data, process, device)
    train_x = data.train.to(device)
    time_sampler = make_time_sampler(tc.time_sampler, process, t_min=tc.t_min)
    eval_sampler = make_time_sampler("adaptive" if tc.time_sampler == "adaptive" else "vp", process, t_min=tc.t_min)
    process_params = [p for p in process.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(config, net, process_params), config.optim.weight_decay, device)
    return Parts(
        device=device, data=data, train_x=train_x, process=process, net=net, parameterization=parameterization,
        model=model, time_sampler=time_sampler, eval_sampler=eval_sampler, process_params=process_params,
        optimizer=optimizer, scheduler=make_scheduler(optimizer, config.optim.warmup),
        ema=EMA(list(net.parameters()) + process_params, config.optim.ema),
        data_gen=streams.data, noise_gen=streams.noise, deq_gen=streams.deq, time_gen=streams.time, aux_gen=streams.aux,
        n_params=count_parameters(net), scaler=make_scaler(config.model.precision, device),
    )
