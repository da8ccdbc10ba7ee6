"""`mdmsearch compare A B`: the held-out BPD margin of two runs, or of two configurations over
their seeds, with its verdict (see :mod:`mdmsearch.compare`).

A and B are comma-separated references: a run directory (written by ``mdmsearch train --out``),
``STUDY/N`` or ``STUDY/best`` (the run of a search trial), and ``STUDY/N+seeds`` /
``STUDY/best+seeds`` (that trial and every completed trial of its study with the same
configuration up to the seed: the leaderboard's ``config_group``).  Each side counts a training
seed once (its first run).  Wire it into the main parser with ``add_compare_command(sub)``.

The heavy modules (numpy/scipy, Optuna, pyarrow) are imported in the functions that use them,
as in the other command modules: building the parser must stay fast for every command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, MDMError

log = logging.getLogger(__name__)

WHAT = "compare"  # the first word of this command's error lines
SEEDS_SUFFIX = "+seeds"
SPLIT_CHOICES = ("heldout", "val", "test")
DATA_KEYS = ("name", "seed", "n_val", "n_test", "options")  # the config.yaml data keys that fix the held-out examples
REF_FORMS = "a run directory, STUDY/N or STUDY/best (optionally +seeds)"


@dataclass(frozen=True)
class Run:
    """One trained run: the reference it came from, its directory, training seed and data."""

    ref: str
    path: Path
    seed: int
    data: dict = field(compare=False)


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its references and its runs, one per distinct seed."""

    name: str
    refs: list
    runs: list

    def as_dict(self) -> dict:
        return {"refs": self.refs, "seeds": [r.seed for r in self.runs], "runs": [str(r.path) for r in self.runs]}


def add_compare_command(sub) -> argparse.ArgumentParser:
    """Register ``compare`` on an argparse sub-parsers object; returns the new parser."""
    p = sub.add_parser("compare", help="held-out BPD margin of two runs or two configurations over seeds, with its verdict",
                       description="A minus B in bits per dimension (negative: A is better).  With one run on each "
                                   "side: the model comparison (paired by example, evaluation noise only) and the "
                                   "structure comparison (not decided with 1 seed).  Otherwise the structure "
                                   "comparison: a t test over training seeds (paired by seed when both sides ran "
                                   "the same seeds, else Welch) and P(A<B) over seeds.")
    p.add_argument("a", metavar="A", help=f"side A, comma-separated: {REF_FORMS}; +seeds adds every completed "
                                          "trial of the study with the same configuration up to the seed, "
                                          "e.g. aux3/best+seeds or runs/a,runs/b")
    p.add_argument("b", metavar="B", help="side B, the same forms, e.g. base/2+seeds")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="heldout",
                   help="held-out examples: heldout (the default: validation then test), val or test")
    p.add_argument("--format", choices=["text", "json"], default="text", help="text lines or one JSON object")
    p.add_argument("--studies-dir", default="studies",
                   help="where the studies live, for STUDY/N references (default: studies/; leaderboard: "
                        "STUDIES_DIR/leaderboard)")
    p.add_argument("--storage", default=None, help="the studies' storage URL, if not their journal files")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Handler of ``mdmsearch compare``; every bad reference is one MDMError line."""
    a = resolve_side("A", args.a, args.studies_dir, args.storage)
    b = resolve_side("B", args.b, args.studies_dir, args.storage)
    check_same_data([*a.runs, *b.runs])
    structure, model = compare_sides(a, b, args.split)
    if args.format == "json":
        out = json.dumps(json_doc(a, b, args.split, structure, model), allow_nan=False)
    else:
        out = "\n".join(text_lines(a, b, args.split, structure, model))
    sys.stdout.write(out + "\n")
    return 0


def resolve_side(name: str, text: str, studies_dir: str | Path, storage) -> Side:
    """The runs of one side's references, the first run of each training seed."""
    refs = [r.strip() for r in text.split(",") if r.strip()]
    if not refs:
        raise ConfigError(f"{WHAT}: side {name} names no run ({REF_FORMS})")
    runs, seeds = [], set()
    for ref in refs:
        for run in resolve_ref(ref, studies_dir, storage):
            if run.seed in seeds:
                log.debug("side %s: %s repeats seed %d; its first run counts", name, run.path, run.seed)
                continue
            seeds.add(run.seed)
            runs.append(run)
    return Side(name, refs, runs)


def resolve_ref(ref: str, studies_dir: str | Path, storage) -> list[Run]:
    """The runs of one reference: an existing directory is a run directory, anything else a
    trial reference."""
    if Path(ref).is_dir():
        return [read_run(ref, Path(ref))]
    from .logs import route_optuna
    from .search.promote import parse_trial_ref, resolve_trial

    expand = ref.endswith(SEEDS_SUFFIX)
    base = ref[: -len(SEEDS_SUFFIX)] if expand else ref
    try:
        study_name, _ = parse_trial_ref(base, WHAT)
    except ConfigError:
        raise ConfigError(f"{WHAT} {ref!r}: no such directory, and not STUDY/N or STUDY/best (optionally "
                          f"+seeds), e.g. aux3/9 or aux3/best+seeds") from None
    route_optuna()
    trial = resolve_trial(base, studies_dir, storage, WHAT)
    dirs = [Path(trial.artifact_dir)]
    if expand:
        dirs += group_dirs(ref, study_name, trial.number, studies_dir)
    return [read_run(ref, d) for d in dirs]


def group_dirs(ref: str, study_name: str, number: int, studies_dir: str | Path) -> list[Path]:
    """The run directories of the other COMPLETE trials of the study whose leaderboard row has
    trial ``number``'s ``config_group`` (its configuration up to the seed), by trial number."""
    rows = study_rows(ref, study_name, studies_dir)
    own = rows.loc[rows["trial"] == number, "config_group"].dropna()
    if own.empty:
        raise MDMError(f"{WHAT} {ref}: trial {number} has no leaderboard row (with a config_group) under "
                       f"{Path(studies_dir) / 'leaderboard'}; write it with "
                       f"`mdmsearch rebuild {study_name} --studies-dir {studies_dir}`")
    same = rows[(rows["config_group"] == own.iloc[0]) & (rows["state"] == "COMPLETE") & rows["artifact_dir"].notna()
                & (rows["trial"] != number)].sort_values("trial")
    return [Path(p) for p in same["artifact_dir"]]


def study_rows(ref: str, study_name: str, studies_dir: str | Path):
    """The leaderboard rows of one study (every dataset it wrote), one DataFrame."""
    import pandas as pd

    from .leaderboard import read_files

    root = Path(studies_dir) / "leaderboard"
    parts = sorted(root.glob(f"dataset=*/study={study_name}"))
    if not parts:
        raise MDMError(f"{WHAT} {ref}: no leaderboard rows of study {study_name!r} under {root}; write them with "
                       f"`mdmsearch rebuild {study_name} --studies-dir {studies_dir}`")
    return pd.concat([read_files(part, root) for part in parts], ignore_index=True)


def read_run(ref: str, path: Path) -> Run:
    """A finished run directory: per-example results present, seed and data from config.yaml."""
    from .compare import PER_EXAMPLE_FILE

    if not path.is_dir():
        where = "" if path.is_absolute() else "; a relative path is read from the current directory: run where the search ran"
        raise MDMError(f"{WHAT} {ref}: {path} is missing (the trial's artifacts were moved or deleted{where})")
    if not (path / PER_EXAMPLE_FILE).is_file():
        raise MDMError(f"{WHAT} {ref}: {path} has no {PER_EXAMPLE_FILE} (not a finished run, or one trained "
                       f"before per-example results were written)")
    config = path / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        raise MDMError(f"{WHAT} {ref}: {config} is missing (the run's training seed is read from it)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MDMError(f"{WHAT} {ref}: {config} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise MDMError(f"{WHAT} {ref}: {config} is not a run config")
    seed = (data.get("train") or {}).get("seed", 0)  # 0: the trainer's default seed
    held_out = {k: (data.get("data") or {}).get(k) for k in DATA_KEYS}
    return Run(ref, path, int(seed), held_out)


def check_same_data(runs: list[Run]) -> None:
    """Every run evaluated the same held-out examples: same data settings (DATA_KEYS)."""
    first = runs[0]
    for run in runs[1:]:
        diff = [f"{k} {first.data[k]!r} vs {run.data[k]!r}" for k in DATA_KEYS if first.data[k] != run.data[k]]
        if diff:
            raise MDMError(f"{WHAT}: {first.path} ({first.ref}) and {run.path} ({run.ref}) evaluated different "
                           f"held-out examples (data {', '.join(diff)})")


def compare_sides(a: Side, b: Side, split: str):
    """(StructureComparison, Comparison or None): the model comparison only with one run each."""
    from .compare import compare_structures, paired, read_runs

    per_side = [read_runs([(r.seed, r.path) for r in side.runs], split=split) for side in (a, b)]
    sizes = {}
    for side, arrays in zip((a, b), per_side):
        for run in side.runs:
            if arrays[run.seed] is None or not arrays[run.seed].size:
                raise MDMError(f"{WHAT} {run.ref}: {run.path} has no readable {split} per-example results")
            sizes.setdefault(arrays[run.seed].size, f"{side.name} {run.path}")
    if len(sizes) > 1:
        where = "; ".join(f"{desc}: {n}" for n, desc in sizes.items())
        raise MDMError(f"{WHAT}: the runs cover different {split} examples ({where} examples)")
    structure = compare_structures(*per_side)
    model = None
    if len(a.runs) == 1 and len(b.runs) == 1:
        model = paired(per_side[0][a.runs[0].seed], per_side[1][b.runs[0].seed])
    return structure, model


def _side_line(side: Side) -> str:
    seeds = ", ".join(str(r.seed) for r in side.runs)
    plural = "s" if len(side.runs) != 1 else ""
    return f"{side.name}: {', '.join(side.refs)} (seed{plural} {seeds}; {len(side.runs)} run{plural})"


def text_lines(a: Side, b: Side, split: str, structure, model) -> list[str]:
    """The text output: the sides, the model comparison (one run each), the structure comparison."""
    lines = [_side_line(a), _side_line(b), f"margin: A - B, {split} bits per dimension (negative: A is better)"]
    if model is not None:
        lines += [f"model: {model.diff:+.4f} bpd, SE {model.se:.4f} (evaluation noise, paired by example, "
                  f"{model.n} examples)", f"  verdict (model): {model.verdict}"]
    s = structure
    se, df = (f"{s.se:.4f} (seed-level)", f"{s.df:.1f}") if s.decided else ("n/a", "n/a")
    pairing = "paired by seed" if s.paired_by_seed else "not paired by seed"
    ci = f" [{s.interval()[0]:+.4f}, {s.interval()[1]:+.4f}] (95% CI)" if s.decided else ""
    lines += [f"structure: {s.diff:+.4f}{ci} bpd, SE {se}, df {df}; {s.n_a} vs {s.n_b} seeds, {pairing}; "
              f"P(A<B) = {s.p_better:.2f}; {s.n_examples} examples per run", f"  verdict (structure): {s.verdict}"]
    return lines


def json_doc(a: Side, b: Side, split: str, structure, model) -> dict:
    """The JSON output (non-finite numbers as null)."""
    doc = {"a": a.as_dict(), "b": b.as_dict(), "split": split, "structure": structure.as_dict()}
    if model is not None:
        doc["model"] = model.as_dict()
    return _finite(doc)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
