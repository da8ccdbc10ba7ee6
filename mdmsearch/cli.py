"""Command line: thin argparse front end -> validated config -> run()."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import MDMError

log = logging.getLogger("mdmsearch")

# flag -> (config section, key, type)
_TRAIN_FLAGS = {
    "dataset": ("data", "name", str),
    "data_dir": ("data", "data_dir", str),
    "download": ("data", "download", None),
    "process": ("process", "name", str),
    "n_aux": ("process", "n_aux", int),
    "q_mask": ("process", "q_mask", str),
    "d_mask": ("process", "d_mask", str),
    "d_param": ("process", "d_param", str),
    "beta_1": ("process", "beta_1", float),
    "gamma": ("process", "gamma", float),
    "model": ("model", "name", str),
    "model_size": ("model", "size", str),
    "parameterization": ("model", "parameterization", str),
    "residual_stats": ("model", "residual_stats", str),
    "batch_size": ("optim", "batch_size", int),
    "lr": ("optim", "lr", float),
    "process_lr": ("optim", "process_lr", float),
    "steps": ("train", "steps", int),
    "eval_every": ("train", "eval_every", int),
    "time_sampler": ("train", "time_sampler", str),
    "seed": ("train", "seed", int),
    "device": ("train", "device", str),
    "n_samples": ("train", "n_samples", int),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for flag, (_, _, typ) in _TRAIN_FLAGS.items():
        opt = "--" + flag.replace("_", "-")
        if typ is None:
            p.add_argument(opt, action="store_true", default=None)
        else:
            p.add_argument(opt, type=typ, default=None)


def _train_config(args: argparse.Namespace):
    from .config import load_yaml, parse_run_config

    data = load_yaml(args.config) if args.config else {}
    for flag, (section, key, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data.setdefault(section, {})[key] = value
    if getattr(args, "quiet", False):
        data.setdefault("train", {})["progress"] = False
    return parse_run_config(data, args.config or "flags")


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import Trainer

    config = _train_config(args)
    metrics = Trainer(config, args.out).fit(resume=args.resume)
    keys = ("val_bpd", "test_bpd", "steps", "train_seconds")
    sys.stdout.write(json.dumps({k: metrics[k] for k in keys}) + "\n")
    return 0


def _load_trainer(run_dir: str):
    from .config import parse_run_config, upgrade_saved_config
    from .training import CHECKPOINT, Trainer, load_checkpoint

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise MDMError(f"{path}: no checkpoint (train with --out {run_dir} first)")
    state = load_checkpoint(path, map_location="cpu")
    config = parse_run_config(upgrade_saved_config(state["config"]), str(path))
    config.train.progress = False
    trainer = Trainer(config, run_dir)
    trainer.load_state_dict(load_checkpoint(path, map_location=trainer.device))
    return trainer


def _cmd_evaluate(args: argparse.Namespace) -> int:
    trainer = _load_trainer(args.run_dir)
    res = trainer.evaluate(args.split, args.n, n_t=args.n_t)
    out = {f"{args.split}_bpd": res["bpd"], f"{args.split}_bpd_se": res["bpd_se"], "n": res["n"],
           "step": trainer.step, "n_t": args.n_t}
    if args.ode:
        out.update(_ode_bpd(trainer, args))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def _ode_bpd(trainer, args) -> dict:
    import math

    import torch

    from .objectives import bits_per_dim
    from .sampling import ode_log_likelihood
    from .training import prepare_batch

    data = getattr(trainer.data, args.split)[: min(args.n or 64, 64)].to(trainer.device)
    gen = torch.Generator(device=trainer.device).manual_seed(trainer.config.train.eval_seed)
    with trainer.ema.applied():
        x, ldj = prepare_batch(data, trainer.data.levels, gen)
        ll = ode_log_likelihood(trainer.process, trainer.model, x, t_min=trainer.config.train.t_min, generator=gen)
    bpd = bits_per_dim(ll.detach(), ldj, trainer.data.dim, trainer.data.levels)
    return {f"{args.split}_ode_bpd": float(bpd.mean()), "ode_n": int(bpd.numel()),
            f"{args.split}_ode_bpd_se": float(bpd.std() / math.sqrt(max(1, bpd.numel() - 1)))}


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    trainer = _load_trainer(args.run_dir)
    trainer.config.train.sample_steps = args.steps
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    from .data import save_image_grid, save_scatter
    from .sampling import sample, to_images

    gen = torch.Generator(device=trainer.device).manual_seed(args.seed)
    trainer.net.eval()
    with trainer.ema.applied():
        x = sample(trainer.process, trainer.model, args.n, tuple(trainer.data.shape), sampler=args.sampler,
                   steps=args.steps, t_min=trainer.config.train.t_min, generator=gen, device=trainer.device)
    if trainer.data.levels is not None:
        save_image_grid(to_images(x, trainer.data.levels).cpu(), out)
    else:
        save_scatter(x.cpu().reshape(x.shape[0], -1)[:, :2], out)
    sys.stdout.write(f"{out}\n")
    return 0


def _cmd_processes(args: argparse.Namespace) -> int:
    from .diffusion import available_processes, preset

    for name in available_processes():
        if name == "learned":
            sys.stdout.write("learned   n = K + 1, Q = U - U^T and D = L L^T learned (masks select free entries)\n")
            continue
        proc = preset(name)
        sys.stdout.write(f"{name:<9} n = {proc.n}  Q = {proc.Q.tolist()}  D = {proc.D.tolist()}  valid = {proc.check().valid}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdmsearch", description="Search, train and evaluate multivariate diffusions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one diffusion (preset or learned structure)")
    p.add_argument("config", nargs="?", help="YAML run config (optional; flags override it)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, metrics, Q/D, samples)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="BPD of a trained run on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--n", type=int, default=None, help="examples (default: the whole split)")
    p.add_argument("--n-t", type=int, default=32, help="stratified time samples per example")
    p.add_argument("--ode", action="store_true", help="also the probability-flow ODE likelihood (first 64 examples)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sample", help="draw a sample grid from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--sampler", choices=["em", "ode"], default="em")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples.png)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("processes", help="list the registered processes and their Q, D")
    p.set_defaults(func=_cmd_processes)

    from .report.cli import add_report_command
    from .search.cli import add_search_commands

    add_search_commands(sub)
    add_report_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MDMError as exc:
        sys.stderr.write(f"mdmsearch: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mdmsearch: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
