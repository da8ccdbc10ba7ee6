"""The inner loop: maximize the ELBO jointly over network weights and the process (Q, D).

    Trainer(config, out_dir, callback).fit(resume=...)  ->  final metrics dict
    Trainer(config, out_dir, callback).run(replay=...)  ->  RunResult (complete or stopped)

Every ``eval_every`` steps: validation BPD with the EMA weights and a fixed evaluation seed,
an atomic checkpoint, then ``callback(step, metrics)``; a callback ends the run early by
raising :class:`StopTraining` (the search's pruner does), which :meth:`Trainer.run` turns into
a stopped :class:`RunResult`.  A resumed run continues exactly as an uninterrupted one (all
randomness comes from generators whose states are checkpointed).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ..config import RunConfig, resolve_parameterization, upgrade_saved_config
from ..data import DataBundle, load_dataset
from ..diffusion.process import LinearMDM
from ..errors import ConfigError, NonFiniteLossError
from ..nets import build_network, count_parameters
from ..objectives import elbo, make_time_sampler
from ..objectives.residual import GaussianStats, ResidualEps, residual_stats
from ..objectives.time_sampling import AdaptiveTime
from .checkpoint import (UNREADABLE, atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint, set_aside,
                         write_parquet_atomic)
from .ema import EMA
from .evaluate import data_moments, evaluate_bpd, prepare_batch
from .progress import StepProgress

log = logging.getLogger(__name__)

Callback = Callable[[int, dict], None]
CHECKPOINT = "checkpoint.pt"
RESIDUAL_STATS_FILE = "residual_stats.json"  # mu, s2 of the Gaussian part (mixed parameterization)
from ..compare import PER_EXAMPLE_FILE  # noqa: E402  per-example val/test BPD for paired comparisons


class StopTraining(Exception):
    """Raised by a callback to end a run early (e.g. a pruner); the message says why."""


@dataclass
class RunProgress:
    """A run's state for callers that stop it early (the search's pruner) or resume it."""

    step: int
    history: list[dict]  # one row per evaluation: step, val_bpd, ...
    best_val: float
    train_seconds: float
    n_params: int

    @property
    def last_val(self) -> Optional[float]:
        return self.history[-1].get("val_bpd") if self.history else None


@dataclass
class RunResult:
    """How :meth:`Trainer.run` ended: ``completed`` with the final ``metrics``, or stopped by
    the callback (``reason``); ``progress`` either way."""

    completed: bool
    progress: RunProgress
    metrics: Optional[dict] = None
    reason: Optional[str] = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def network_name(config: RunConfig, data_shape: tuple[int, ...]) -> str:
    if config.model.name != "auto":
        return config.model.name
    return "mlp" if len(data_shape) == 1 else "unet"


# devices with fused Adam kernels: one kernel for all parameters
_FUSED_ADAM_DEVICES = ("cpu", "cuda")


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


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """2-norm of all gradients together (float64 scalar).

    On GPUs the multi-tensor norm of ``get_total_norm``.  On CPU, where multi-tensor kernels
    loop over the tensors one by one, one norm of each dtype's gradients concatenated is
    3x cheaper for small networks (0.12 vs 0.36 ms for the tiny U-Net's 130 tensors) and costs
    one copy of the gradients for large ones (a few ms against a step of seconds)."""
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads, foreach=True).to(torch.float64)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g.reshape(-1))
    norms = [torch.linalg.vector_norm(torch.cat(flat)).to(torch.float64) for flat in by_dtype.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


class Trainer:
    def __init__(self, config: RunConfig, out_dir: str | Path, callback: Optional[Callback] = None,
                 data: Optional[DataBundle] = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.callback = callback
        self.device = resolve_device(config.train.device)
        tc = config.train
        torch.manual_seed(tc.seed)
        self.data = data if data is not None else load_dataset(
            config.data.name, data_dir=config.data.data_dir, seed=config.data.seed, n_train=config.data.n_train,
            n_val=config.data.n_val, n_test=config.data.n_test, download=config.data.download, **config.data.options)
        self.process: LinearMDM = config.process.build(seed=tc.seed).to(self.device)
        self.process.validate()  # invalid structures cost no training
        self.net = build_network(network_name(config, self.data.shape), n_vars=self.process.n,
                                 data_shape=tuple(self.data.shape), size=config.model.size,
                                 **config.model.options).to(self.device)
        # the noise predictor the ELBO, evaluation and samplers see: the network, or the exact
        # Gaussian-data prediction plus the network (statistics of the training split, fixed)
        self.parameterization = resolve_parameterization(config.model.parameterization, self.process.n_aux)
        self.model = (ResidualEps(self.net, self._residual_stats()).to(self.device)
                      if self.parameterization == "mixed" else self.net)
        self.train_x = self.data.train.to(self.device)
        self.time_sampler = make_time_sampler(tc.time_sampler, self.process, t_min=tc.t_min)
        self.eval_sampler = make_time_sampler("adaptive" if tc.time_sampler == "adaptive" else "vp",
                                              self.process, t_min=tc.t_min)
        self.process_params = [p for p in self.process.parameters() if p.requires_grad]
        groups = [{"params": list(self.net.parameters()), "lr": config.optim.lr,
                   "weight_decay": config.optim.weight_decay}]
        if self.process_params and config.optim.process_lr > 0:
            groups.append({"params": self.process_params, "lr": config.optim.process_lr, "weight_decay": 0.0})
        self.optimizer = make_optimizer(groups, config.optim.weight_decay, self.device)
        warmup = config.optim.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.ema = EMA(list(self.net.parameters()) + self.process_params, config.optim.ema)
        self.data_gen = torch.Generator().manual_seed(tc.seed + 1)  # batch indices (CPU)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(tc.seed + 2)  # t, eps, dequantization
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.best_val = math.inf
        self.n_params = count_parameters(self.net)
        self._last_eval: Optional[tuple] = None
        self.running_loss: Optional[float] = None

    # ------------------------------------------------------------------ pieces
    def _residual_stats(self) -> GaussianStats:
        """mu, s2 per coordinate of the training split in model space (dequantized with a fixed
        seed, logit-transformed), reduced to ``model.residual_stats``."""
        gen = torch.Generator().manual_seed(self.config.train.seed + 3)
        mean, var = data_moments(self.data.train, self.data.levels, gen)
        return GaussianStats(*residual_stats(mean, var, self.config.model.residual_stats),
                             kind=self.config.model.residual_stats)

    @property
    def residual(self) -> Optional[GaussianStats]:
        return self.model.stats if isinstance(self.model, ResidualEps) else None

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Negative ELBO in nats per dimension without the truncation term at t_min: that term
        costs a second network pass, and its value (and so its pull on Q and D) is small, 0.001
        to 0.014 nats/dim for trained digits models; evaluation always includes it."""
        x, _ = prepare_batch(batch, self.data.levels, self.noise_gen)
        nats = elbo(self.process, x, self.model, time_sampler=self.time_sampler, truncation=False,
                    generator=self.noise_gen)
        return -nats.mean() / self.data.dim

    def train_step(self) -> float:
        idx = torch.randint(0, self.train_x.shape[0], (self.config.optim.batch_size,), generator=self.data_gen)
        batch = self.train_x[idx.to(self.device)]
        if not self.net.training:  # (evaluation switches it off; walking the modules every step costs)
            self.net.train()
        loss = self.loss(batch)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at step {self.step + 1} for process {self.process.name!r} "
                f"(Q={self.process.Q.detach().tolist()}, D={self.process.D.detach().tolist()}); "
                "lower the learning rates or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.step)
        self.step += 1
        if isinstance(self.time_sampler, AdaptiveTime) and self.step % self.config.train.adaptive_refresh == 0:
            self.time_sampler.refresh(self.process)
        return value

    def _clip_gradients(self) -> None:
        """Scale all gradients (network and process) to a total 2-norm of at most ``optim.grad_clip``.

        The same rule as ``clip_grad_norm_`` (factor min(1, c / (norm + 1e-6))), but the norm is read
        once on the host, which the finiteness check needs anyway, and gradients are multiplied
        only when the factor is below 1: the multiply-by-one of every step cost as much as the
        norm on CPU (0.35 of 0.9 ms per digits step)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = _total_norm([p.grad for p in params])
        norm = float(total)
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"non-finite gradient at step {self.step + 1}")
        max_norm = self.config.optim.grad_clip
        if max_norm / (norm + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)

    def evaluate(self, split: str = "val", n_examples: Optional[int] = None, n_t: Optional[int] = None) -> dict:
        tc = self.config.train
        n_t = tc.eval_n_t if n_t is None else int(n_t)
        data = getattr(self.data, split)
        if n_examples is not None:
            data = data[:n_examples]
        key = (split, self.step, int(data.shape[0]), n_t)
        if self._last_eval is not None and self._last_eval[0] == key:
            return dict(self._last_eval[1])  # same weights, same data, same seed: same numbers
        self.net.eval()
        with self.ema.applied():
            if isinstance(self.eval_sampler, AdaptiveTime):
                self.eval_sampler.refresh(self.process)
            res = evaluate_bpd(self.process, self.model, data, self.data.levels, time_sampler=self.eval_sampler,
                               batch_size=tc.eval_batch_size, n_t=n_t, seed=tc.eval_seed, device=self.device,
                               return_all=True)
        self._last_eval = (key, dict(res))
        return res

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "config": self.config.model_dump(mode="json"),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "best_val": self.best_val,
            "running_loss": self.running_loss,
            "net": self.net.state_dict(),
            "parameterization": self.parameterization,
            "residual_stats": self.residual.state_dict() if self.residual is not None else None,
            "process": self.process.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_gen.get_state(),
                    "noise": self.noise_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "time_sampler": self.time_sampler.state_dict() or None,
        }

    def _check_parameterization(self, state: dict) -> None:
        saved = state.get("parameterization", "eps")  # checkpoints before the residual were eps
        if saved != self.parameterization:
            raise ConfigError(f"checkpoint was written with model.parameterization={saved!r}, but this run uses "
                              f"{self.parameterization!r}; the network outputs mean different things")

    def load_state_dict(self, state: dict) -> None:
        self._check_parameterization(state)
        if self.residual is not None:
            self.residual.load_state_dict(state["residual_stats"])  # the statistics trained with, not recomputed
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        self.history = state["history"]
        self.best_val = state["best_val"]
        self.running_loss = state.get("running_loss")
        self.net.load_state_dict(state["net"])
        self.process.load_state_dict(state["process"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data_gen.set_state(state["rng"]["data"])
        self.noise_gen.set_state(state["rng"]["noise"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state.get("time_sampler") and self.time_sampler.state_dict():  # (a sampler without state keeps none)
            self.time_sampler.load_state_dict(state["time_sampler"], device=self.device)

    def save(self) -> None:
        save_checkpoint(self.out_dir / CHECKPOINT, self.state_dict())

    def progress(self) -> "RunProgress":
        """Where the run stands, complete or stopped early (what a search records of it)."""
        return RunProgress(step=self.step, history=list(self.history), best_val=self.best_val,
                           train_seconds=self.train_seconds, n_params=self.n_params)

    def try_resume(self) -> bool:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = load_checkpoint(path, map_location=self.device)
        except UNREADABLE as exc:  # torn or damaged at rest: start this run again from scratch
            set_aside(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return False
        saved = upgrade_saved_config(state["config"])
        current = self.config.model_dump(mode="json")
        # the budget may grow on resume; everything else must match
        saved["train"] = {k: v for k, v in saved["train"].items() if k not in ("steps", "progress")}
        cur_cmp = {**current, "train": {k: v for k, v in current["train"].items() if k not in ("steps", "progress")}}
        if saved != cur_cmp:
            differ = _differing_keys(saved, cur_cmp)
            raise ConfigError(f"{path}: checkpoint was written by a different configuration ({', '.join(differ[:5])}"
                              f"{', ...' if len(differ) > 5 else ''}); use another --out")
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> dict:
        tc = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        if resume:
            self.try_resume()
        if self.residual is not None:
            atomic_write_json(self.out_dir / RESIDUAL_STATS_FILE, self.residual.to_dict())
        if self.step == 0:
            log.info("process %s (n=%d, %s), network %d params, dataset %s %s", self.process.name, self.process.n,
                     "learned" if self.process_params else "fixed", self.n_params, self.data.name, self.data.shape)
        bar = _progress(tc, self.step)
        while self.step < tc.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.train_seconds += time.perf_counter() - t0
            # smoothed training loss (nats/dim), checkpointed so a resumed curve continues
            self.running_loss = loss if self.running_loss is None else 0.98 * self.running_loss + 0.02 * loss
            if bar is not None:
                bar.update(self.running_loss, self.best_val)
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                self._eval_and_checkpoint(self.running_loss)
        if bar is not None:
            bar.close()
        return self.finish()

    def run(self, *, resume: bool = True, replay: bool = False) -> RunResult:
        """:meth:`fit` for callers that may stop the run early: a callback raising
        :class:`StopTraining` ends it with a result instead of an exception.  ``replay``: after
        resuming, the restored evaluations go through the callback first, so that a pruner
        judges the whole curve, not just the part after a crash."""
        try:
            if resume and self.try_resume() and replay and self.callback is not None:
                for row in list(self.history):
                    self.callback(int(row["step"]), dict(row))
            metrics = self.fit(resume=False)
        except StopTraining as stop:
            return RunResult(False, self.progress(), reason=str(stop) or f"stopped at step {self.step}")
        return RunResult(True, self.progress(), metrics=metrics)

    def _eval_and_checkpoint(self, running_loss: Optional[float]) -> None:
        res = self.evaluate("val", self.config.train.eval_examples)
        self.best_val = min(self.best_val, res["bpd"])
        row = {"step": self.step, "train_loss": running_loss, "val_bpd": res["bpd"], "val_bpd_se": res["bpd_se"],
               "train_seconds": self.train_seconds}
        self.history.append(row)
        log.info("step %d  loss %.4f  val_bpd %.4f", self.step, running_loss if running_loss is not None else float("nan"), res["bpd"])
        self.save()
        self._write_history()
        if self.callback is not None:
            self.callback(self.step, dict(row))

    def _write_history(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["step", "train_loss", "val_bpd", "val_bpd_se", "train_seconds"])
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.out_dir / "history.csv", buf.getvalue())

    def process_summary(self) -> dict:
        with self.ema.applied():
            q = self.process.Q.detach().cpu()
            d = self.process.D.detach().cpu()
            a = self.process.A.detach().cpu()
        return {"name": self.process.name, "n_aux": self.process.n_aux, "Q": q.tolist(), "D": d.tolist(),
                "eig_A_real": torch.linalg.eigvals(a).real.tolist(), "eig_A_imag": torch.linalg.eigvals(a).imag.tolist(),
                "structure": self.process.structure(), "structure_hash": self.process.structure_hash()}

    def finish(self) -> dict:
        """Final evaluation (val, then test once), artifacts and metrics.json."""
        from ..viz import plot_qd

        tc = self.config.train
        # the final evaluation ranks runs: both held-out splits with test_n_t strata (paired SE of a
        # difference between two digits runs ~0.005 bpd at 384), validation during training with eval_n_t
        val = self.evaluate("val", n_t=tc.test_n_t)
        test = self.evaluate("test", n_t=tc.test_n_t)
        self._write_per_example(val, test)
        summary = self.process_summary()
        metrics = {
            "dataset": self.data.name, "process": self.process.name, "n_aux": self.process.n_aux,
            "structure_hash": summary["structure_hash"], "steps": self.step, "train_seconds": self.train_seconds,
            "n_params": self.n_params, "val_bpd": val["bpd"], "val_bpd_se": val["bpd_se"], "val_n": val["n"],
            "test_bpd": test["bpd"], "test_bpd_se": test["bpd_se"], "test_n": test["n"],
            "val_n_t": tc.test_n_t, "test_n_t": tc.test_n_t,
            "best_val_bpd": min(self.best_val, val["bpd"]), "prior_kl_per_dim": val["prior_kl_per_dim"],
            "Q": summary["Q"], "D": summary["D"], "levels": self.data.levels, "dim": self.data.dim,
        }
        atomic_write_json(self.out_dir / "process.json", summary)
        plot_qd(summary["Q"], summary["D"], self.out_dir / "qd.png",
                title=f"{self.process.name} (K={self.process.n_aux}) after {self.step} steps")
        if tc.n_samples > 0:
            metrics["samples"] = self.write_samples(tc.n_samples)
        atomic_write_json(self.out_dir / "metrics.json", metrics)
        log.info("done: val_bpd %.4f test_bpd %.4f (%d steps, %.1fs)", val["bpd"], test["bpd"], self.step, self.train_seconds)
        return metrics

    def _write_per_example(self, val: dict, test: dict) -> None:
        """Per-example BPD of the final evaluations (same examples and evaluation seed in every
        run on this data: paired comparisons between runs come from these files)."""
        import pandas as pd

        frames = [pd.DataFrame({"split": split, "index": range(len(res["per_example"])),
                                "bpd": res["per_example"].numpy(), "n_t": n_t})
                  for split, res, n_t in (("val", val, self.config.train.test_n_t),
                                          ("test", test, self.config.train.test_n_t))]
        write_parquet_atomic(pd.concat(frames, ignore_index=True), self.out_dir / PER_EXAMPLE_FILE)

    def write_samples(self, n: int) -> str:
        from ..sampling import sample, to_images
        from ..data import save_image_grid, save_scatter

        gen = torch.Generator(device=self.device).manual_seed(self.config.train.eval_seed)
        self.net.eval()
        with self.ema.applied():
            x = sample(self.process, self.model, n, tuple(self.data.shape), sampler="em",
                       steps=self.config.train.sample_steps, t_min=self.config.train.t_min, generator=gen,
                       device=self.device)
        path = self.out_dir / "samples.png"
        if self.data.levels is not None:
            save_image_grid(to_images(x, self.data.levels).cpu(), path)
        elif len(self.data.shape) == 1 and self.data.shape[0] == 2:
            save_scatter(x.cpu(), path)
        else:
            return ""
        return path.name


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configuration dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _progress(tc, initial: int) -> Optional[StepProgress]:
    """A live bar on a terminal, a log line per tenth of the run elsewhere; nothing without progress."""
    return StepProgress(tc.steps, initial) if tc.progress else None
