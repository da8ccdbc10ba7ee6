"""Command line: thin argparse front end -> validated config -> run()."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .compare_cli import add_compare_command
from .errors import MDMError
from .logs import setup_logging
from .preflight import check_quality, check_writable_dir
from .report.cli import add_report_command
from .search.cli import add_search_commands

log = logging.getLogger("mdmsearch")

# flag -> (config section, key, type, help)
_TRAIN_FLAGS = {
    "dataset": ("data", "name", str, "dataset: gaussian, checkerboard, moons, 8gaussians, digits, mnist, cifar10, imagenet32"),
    "data_dir": ("data", "data_dir", str, "directory with the dataset files (mnist, cifar10, imagenet32)"),
    "download": ("data", "download", None, "download the dataset with torchvision when it is not on disk"),
    "process": ("process", "name", str, "vpsde, cld, alda, malda (fixed) or learned"),
    "n_aux": ("process", "n_aux", int, "auxiliary variables K of a learned process (0..6)"),
    "q_mask": ("process", "q_mask", str, "Q sparsity pattern of a learned process: full, chain, none"),
    "d_mask": ("process", "d_mask", str, "D sparsity pattern of a learned process: full, diag, chain, aux, last"),
    "d_param": ("process", "d_param", str, "D parameterization of a learned process: full or diag"),
    "beta_1": ("process", "beta_1", float, "noise schedule beta(t) at t = T"),
    "gamma": ("process", "gamma", float, "variance of the auxiliary variables at t = 0"),
    "model": ("model", "name", str, "score network: auto (mlp for vectors, unet for images), mlp, unet"),
    "model_size": ("model", "size", str, "network size preset, e.g. tiny, small"),
    "parameterization": ("model", "parameterization", str,
                         "noise predictor: auto (the default: mixed with auxiliary variables, eps without), mixed "
                         "(exact Gaussian part + network) or eps (network alone)"),
    "residual_stats": ("model", "residual_stats", str, "statistics of the Gaussian part: global (the default), floored, pixel"),
    "precision": ("model", "precision", str, "the score network's arithmetic: fp32 (the default), bf16, fp16 (autocast; "
                                             "the process and the ELBO stay float64/float32)"),
    "batch_size": ("optim", "batch_size", int, "training batch size"),
    "lr": ("optim", "lr", float, "learning rate of the network"),
    "process_lr": ("optim", "process_lr", float, "learning rate of Q and D (learned processes)"),
    "steps": ("train", "steps", int, "training steps"),
    "eval_every": ("train", "eval_every", int, "steps between validation + checkpoint"),
    "time_sampler": ("train", "time_sampler", str, "distribution of t in training: uniform, vp, adaptive"),
    "seed": ("train", "seed", int, "training seed"),
    "device": ("train", "device", str, "auto, cpu, cuda, cuda:1, ..."),
    "nproc": ("train", "devices", int, "processes that train the run together, data parallel (train.devices, default "
                                       "1): CPU processes sharing the cores, or one per GPU (cuda:0..N-1); the batch "
                                       "is split evenly between them"),
    "n_samples": ("train", "n_samples", int, "samples drawn into samples.png at the end (0 = none)"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for flag, (_, _, typ, text) in _TRAIN_FLAGS.items():
        opt = "--" + flag.replace("_", "-")
        if typ is None:
            p.add_argument(opt, action="store_true", default=None, help=text)
        else:
            p.add_argument(opt, type=typ, default=None, help=text)


def _train_config(args: argparse.Namespace):
    from .config import load_yaml, parse_run_config  # lazy: pydantic costs ~0.09 s (--help: 0.07 s)

    source = args.config or "flags"
    if getattr(args, "from_trial", None):
        if args.config:
            raise MDMError("give a run config or --from-trial, not both")
        from .search.promote import trial_run_config  # lazy: optuna costs ~0.12 s, for --from-trial only

        data, source = trial_run_config(args.from_trial, args.studies_dir, args.storage)
    elif getattr(args, "resume", False) and not args.config:
        data, source = _resumed_config(args.out)
    else:
        data = load_yaml(args.config) if args.config else {}
    flags = {}
    for flag, (section, key, _, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            if not isinstance(data.setdefault(section, {}), dict):
                raise MDMError(f"{args.config}: {section} must be a mapping")
            data[section][key] = value
            flags[(section, key)] = f"--{flag.replace('_', '-')} {value}" if typ_of(flag) else f"--{flag.replace('_', '-')}"
    if getattr(args, "quiet", False) or getattr(args, "no_progress", False):
        data.setdefault("train", {})["progress"] = False
    return parse_run_config(data, source, flags)


def _resumed_config(out: str) -> tuple[dict, str]:
    """The configuration a run directory was trained with (its config.yaml), for ``--resume``
    without a run config: continuing a run needs no command line but the directory; flags given
    override what they name (``--steps`` to train longer)."""
    from .config import upgrade_saved_config  # lazy: pydantic, see _train_config
    from .training.artifacts import CONFIG_FILE
    from .yamlio import read_saved_config

    path = Path(out) / CONFIG_FILE
    data = read_saved_config(path, "--resume", "not a run directory written by `mdmsearch train --out`")
    return upgrade_saved_config(data), f"{path} (--resume)"


def typ_of(flag: str):
    return _TRAIN_FLAGS[flag][2]


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import CHECKPOINT
    from .training.launch import is_main_process, run  # lazy: torch (+ scipy) costs ~2 s on every command

    if args.resume and not (Path(args.out) / CHECKPOINT).is_file():
        raise MDMError(f"--resume: no checkpoint to resume in {args.out} ({CHECKPOINT} is missing); "
                       f"leave out --resume to train from scratch")
    config = _train_config(args)
    check_quality(config.train.quality, config.data, "train.quality")
    check_writable_dir(args.out, "--out")
    metrics = run(config, args.out, resume=args.resume).metrics  # (train.devices processes; no callback stops it)
    keys = ("val_bpd", "test_bpd", "steps", "train_seconds")
    if is_main_process():  # (under torchrun, rank 0 speaks for the run)
        sys.stdout.write(json.dumps({k: metrics[k] for k in keys}) + "\n")
    return 0


def _load_trainer(run_dir: str):
    """The run in ``run_dir`` at its checkpoint (configuration and weights), on its device."""
    from .config import parse_run_config, upgrade_saved_config  # lazy: pydantic, see _train_config
    from .training import CHECKPOINT, Trainer, load_checkpoint  # lazy: torch, see _cmd_train
    from .training.checkpoint import UNREADABLE

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise MDMError(f"{path}: no checkpoint (train with --out {run_dir} first)")
    try:
        state = load_checkpoint(path, map_location="cpu")
    except UNREADABLE as exc:
        raise MDMError(f"{path}: damaged checkpoint ({type(exc).__name__}); re-train with --resume to restart it") from None
    config = parse_run_config(upgrade_saved_config(state["config"]), str(path))
    config.train.progress = False
    trainer = Trainer(config, run_dir)
    # the state loaded on the host (generator states must stay CPU byte tensors; weights move as they
    # load); the model alone: evaluation and sampling use none of training's generators or optimizer
    trainer.load_state_dict(state, training=False)
    return trainer


def _cmd_evaluate(args: argparse.Namespace) -> int:
    trainer = _load_trainer(args.run_dir)
    res = trainer.evaluate(args.split, args.n, n_t=args.n_t)
    out = {f"{args.split}_bpd": res["bpd"], f"{args.split}_bpd_se": res["bpd_se"], "n": res["n"],
           "step": trainer.step, "n_t": args.n_t}
    if args.ode:
        out.update(_ode_bpd(trainer, args.split, args.n))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


ODE_MAX_EXAMPLES = 64  # the ODE likelihood integrates one batch: the first examples of the split


def _ode_bpd(trainer, split: str, n: int | None) -> dict:
    """PF-ODE BPD of the run's reported model on the first ``n`` (at most 64) examples of ``split``."""
    from .training import ode_evaluate  # lazy: torch, see _cmd_train

    data = getattr(trainer.data, split)[: min(n or ODE_MAX_EXAMPLES, ODE_MAX_EXAMPLES)]
    tc = trainer.config.train
    res = ode_evaluate(trainer, data, trainer.data.levels, t_min=tc.t_min, seed=tc.eval_seed)
    return {f"{split}_ode_bpd": res["bpd"], "ode_n": res["n"], f"{split}_ode_bpd_se": res["bpd_se"]}


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import save_sample_figure  # lazy: torch, see _cmd_train
    from .training import draw_samples

    trainer = _load_trainer(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    x = draw_samples(trainer, args.n, tuple(trainer.data.shape), sampler=args.sampler, steps=args.steps,
                     t_min=trainer.config.train.t_min, seed=args.seed)
    save_sample_figure(x, trainer.data.levels, out, first_two=True)  # (any vector data: its first two coordinates)
    sys.stdout.write(f"{out}\n")
    return 0


def _cmd_processes(args: argparse.Namespace) -> int:
    from .diffusion import available_processes, preset  # lazy: torch, see _cmd_train

    for name in available_processes():
        if name == "learned":
            sys.stdout.write("learned   n = K + 1, Q = U - U^T and D = L L^T learned (masks select free entries)\n")
            continue
        proc = preset(name)
        sys.stdout.write(f"{name:<9} n = {proc.n}  Q = {proc.Q.tolist()}  D = {proc.D.tolist()}  valid = {proc.check().valid}\n")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other mdmsearch error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _global_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    """-v/-q/--log-file, accepted before or after the sub-command."""
    default = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and dependency warnings)", **default)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only; no progress bar", **default)
    p.add_argument("--log-file", metavar="PATH", help="also append the log to PATH", **default)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mdmsearch", description="Search, train and evaluate multivariate diffusions.")
    parser.add_argument("--version", action="version", version=f"mdmsearch {__version__}")
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one diffusion (preset or learned structure)")
    p.add_argument("config", nargs="?", help="YAML run config (optional; flags override it), e.g. configs/digits_learned.yaml")
    p.add_argument("--out", required=True, help="output directory (checkpoint, metrics, Q/D, samples)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the configuration it was trained with "
                        "(flags override it, e.g. --steps 2000; a run config, if given, replaces it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also implied by -q)")
    p.add_argument("--from-trial", default=None, metavar="STUDY/N",
                   help="start from the exact configuration of a search trial (STUDY/N, or STUDY/best for the "
                        "lowest val_bpd); flags override it, e.g. --steps 20000")
    p.add_argument("--studies-dir", default="studies", help="where studies live, for --from-trial (default: studies/)")
    p.add_argument("--storage", default=None, help="the study's storage URL for --from-trial, if not its journal file")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="BPD of a trained run on a split")
    p.add_argument("run_dir", help="a directory written by `mdmsearch train --out`")
    p.add_argument("--split", choices=["val", "test"], default="test", help="split to evaluate (default: test)")
    p.add_argument("--n", type=int, default=None, help="examples (default: the whole split)")
    p.add_argument("--n-t", type=int, default=32, help="stratified time samples per example")
    p.add_argument("--ode", action="store_true", help="also the probability-flow ODE likelihood (first 64 examples)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sample", help="draw a sample grid from a trained run")
    p.add_argument("run_dir", help="a directory written by `mdmsearch train --out`")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--steps", type=int, default=500, help="solver steps")
    p.add_argument("--sampler", choices=["em", "ode"], default="em", help="Euler-Maruyama (em) or probability-flow ODE")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples.png)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("processes", help="list the registered processes and their Q, D")
    p.set_defaults(func=_cmd_processes)

    add_search_commands(sub)
    add_report_command(sub)
    add_compare_command(sub)
    for name, subparser in sub.choices.items():
        _global_flags(subparser, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False), getattr(args, "log_file", None))
        return int(args.func(args) or 0)
    except MDMError as exc:
        sys.stderr.write(f"mdmsearch: error: {exc}\n")
        return 2
    except OSError as exc:  # an I/O failure outside the validated setup (disk full, permissions)
        sys.stderr.write(f"mdmsearch: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("mdmsearch: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
