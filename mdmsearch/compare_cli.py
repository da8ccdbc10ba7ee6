"""`mdmsearch compare A B`: the held-out BPD margin of two runs, or of two configurations over
their seeds, with its verdict (see :mod:`mdmsearch.compare`).

A and B are comma-separated references: a run directory (written by ``mdmsearch train --out``),
``STUDY/N``, ``STUDY/best`` or ``STUDY/baseline`` (the run of a trial; best and baseline as
:mod:`mdmsearch.search.answer` names them), and ``STUDY/N+seeds`` / ``STUDY/best+seeds`` (every
completed trial of its study with the same configuration up to the seed: the leaderboard's
``config_group``; only the fresh seeds of the confirmation when it raced the configuration, so that
``aux3/best+seeds`` vs ``aux3/baseline+seeds`` is the confirmation's selection-free margin;
``+allseeds`` takes every seed).  Each side counts a training
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional


from .errors import ConfigError, MDMError
from .yamlio import read_saved_config

log = logging.getLogger(__name__)

WHAT = "compare"  # the first word of this command's error lines
SEEDS_SUFFIX = "+seeds"  # the configuration's seeds: its fresh ones when a confirmation raced it
ALL_SEEDS_SUFFIX = "+allseeds"  # every seed, those that selected it included
SPLIT_CHOICES = ("heldout", "val", "test")
DATA_KEYS = ("name", "seed", "n_val", "n_test", "options")  # the config.yaml data keys that fix the held-out examples
REF_FORMS = "a run directory, STUDY/N, STUDY/best or STUDY/baseline (optionally +seeds or +allseeds)"


@dataclass(frozen=True)
class Run:
    """One trained run: the reference it came from, its directory, training seed and data."""

    ref: str
    path: Path
    seed: int
    data: dict = field(compare=False)
    fresh: bool = field(default=False, compare=False)  # a confirmation trial's run (a fresh seed)
    level: Optional[float] = field(default=None, compare=False)  # its confirmation's verdict level (winner/baseline)


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
    p.add_argument("a", metavar="A", help=f"side A, comma-separated: {REF_FORMS}; +seeds: every completed trial "
                                          "of the study with the same configuration up to the seed (only its "
                                          "fresh seeds when the study's confirmation raced it: the seeds that "
                                          "took no part in selecting it), +allseeds: all of them, e.g. "
                                          "aux3/best+seeds or runs/a,runs/b")
    p.add_argument("b", metavar="B", help="side B, the same forms, e.g. aux3/baseline+seeds")
    p.add_argument("--split", choices=SPLIT_CHOICES, default=None,
                   help="held-out examples: heldout (validation then test), val or test; default: test when "
                        "every run is a confirmation's fresh seed (validation decided the race, as the "
                        "confirmation reports it), else heldout")
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
    runs = (*a.runs, *b.runs)
    split = args.split or ("test" if all(r.fresh for r in runs) else "heldout")
    structure, model = compare_sides(a, b, split)
    levels = {r.level for r in runs}
    if len(levels) == 1 and None not in levels and split == "test":  # the confirmation's winner vs its baseline
        structure = replace(structure, alpha=levels.pop())  # ... judged as the confirmation judged it
    if args.format == "json":
        out = json.dumps(json_doc(a, b, split, structure, model), allow_nan=False)
    else:
        out = "\n".join(text_lines(a, b, split, structure, model))
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

    suffix = next((s for s in (SEEDS_SUFFIX, ALL_SEEDS_SUFFIX) if ref.endswith(s)), "")
    base = ref[: len(ref) - len(suffix)]
    try:
        study_name, _ = parse_trial_ref(base, WHAT)
    except ConfigError:
        raise ConfigError(f"{WHAT} {ref!r}: no such directory, and not STUDY/N, STUDY/best or STUDY/baseline "
                          f"(optionally +seeds or +allseeds), e.g. aux3/9 or aux3/best+seeds") from None
    route_optuna()
    trial = resolve_trial(base, studies_dir, storage, WHAT)
    if not suffix:
        return [read_run(ref, Path(trial.artifact_dir), fresh=trial.confirm is not None)]
    members = group_dirs(ref, study_name, trial.number, studies_dir, every=suffix == ALL_SEEDS_SUFFIX)
    own = [m for m in members if m[0] == Path(trial.artifact_dir)]  # the trial named first (its seed's run counts)
    return [read_run(ref, d, fresh=f, level=lv) for d, f, lv in own + [m for m in members if m not in own]]


def group_dirs(ref: str, study_name: str, number: int, studies_dir: str | Path,
               every: bool = False) -> list[tuple[Path, bool, Optional[float]]]:
    """(run directory, fresh, level) of the COMPLETE trials of the study whose leaderboard row has
    trial ``number``'s ``config_group`` (its configuration up to the seed), by trial number: only
    those of the confirmation (fresh seeds) when it raced the configuration, unless ``every``; for
    the confirmed winner and its baseline, the seeds behind the confirmation's margin, with the
    level (alpha) of its verdict."""
    rows = study_rows(ref, study_name, studies_dir)
    own = rows.loc[rows["trial"] == number, "config_group"].dropna()
    if own.empty:
        raise MDMError(f"{WHAT} {ref}: trial {number} has no leaderboard row (with a config_group) under "
                       f"{Path(studies_dir) / 'leaderboard'}; write it with "
                       f"`mdmsearch rebuild {study_name} --studies-dir {studies_dir}`")
    same = rows[(rows["config_group"] == own.iloc[0]) & (rows["state"] == "COMPLETE")
                & rows["artifact_dir"].notna()].sort_values("trial")
    fresh = same["confirm_round"].notna() if "confirm_round" in same.columns else same["trial"] < 0
    if not fresh.any() or every:
        return [(Path(p), bool(f), None) for p, f in zip(same["artifact_dir"], fresh)]
    same = same[fresh]
    info = _confirmation(study_name, studies_dir)
    if own.iloc[0] in ((info.get("winner") or {}).get("group"), (info.get("baseline") or {}).get("group")):
        same = same[same["seed"].isin(info.get("fresh_seeds") or [])]
        return [(Path(p), True, (info.get("vs_baseline") or {}).get("alpha")) for p in same["artifact_dir"]]
    return [(Path(p), True, None) for p in same["artifact_dir"]]


def _confirmation(study_name: str, studies_dir: str | Path) -> dict:
    """The study's ended confirmation as the leaderboard keeps it ({} without one)."""
    from .leaderboard import read_confirmations

    found = read_confirmations(Path(studies_dir) / "leaderboard")
    return next((info for (_, study), info in found.items() if study == study_name), {})


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


def read_run(ref: str, path: Path, fresh: bool = False, level: Optional[float] = None) -> Run:
    """A finished run directory: per-example results present, seed and data from config.yaml."""
    from .compare import PER_EXAMPLE_FILE

    if not path.is_dir():
        where = "" if path.is_absolute() else "; a relative path is read from the current directory: run where the search ran"
        raise MDMError(f"{WHAT} {ref}: {path} is missing (the trial's artifacts were moved or deleted{where})")
    if not (path / PER_EXAMPLE_FILE).is_file():
        raise MDMError(f"{WHAT} {ref}: {path} has no {PER_EXAMPLE_FILE} (not a finished run, or one trained "
                       f"before per-example results were written)")
    data = read_saved_config(path / "config.yaml", f"{WHAT} {ref}", "the run's training seed is read from it")
    seed = (data.get("train") or {}).get("seed", 0)  # 0: the trainer's default seed
    held_out = {k: (data.get("data") or {}).get(k) for k in DATA_KEYS}
    return Run(ref, path, int(seed), held_out, fresh, level)


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
    fresh = ("; fresh seeds of the confirmation: the seeds that selected it are left out (+allseeds adds them)"
             if side.runs and all(r.fresh for r in side.runs) and len(side.runs) > 1 else "")
    return f"{side.name}: {', '.join(side.refs)} (seed{plural} {seeds}; {len(side.runs)} run{plural}{fresh})"


def text_lines(a: Side, b: Side, split: str, structure, model) -> list[str]:
    """The text output: the sides, the model comparison (one run each), the structure comparison."""
    from .compare import ALPHA, level_text

    lines = [_side_line(a), _side_line(b), f"margin: A - B, {split} bits per dimension (negative: A is better)"]
    if model is not None:
        lines += [f"model: {model.diff:+.4f} bpd, SE {model.se:.4f} (evaluation noise, paired by example, "
                  f"{model.n} examples)", f"  verdict (model): {model.verdict}"]
    s = structure
    se, df = (f"{s.se:.4f} (seed-level)", f"{s.df:.1f}") if s.decided else ("n/a", "n/a")
    pairing = "paired by seed" if s.paired_by_seed else "not paired by seed"
    lo, hi = s.interval(s.alpha) if s.decided else (None, None)
    level = ("95% CI" if s.alpha == ALPHA else
             f"{level_text(s.alpha)}: the level of the confirmation's verdict, as it reports it")
    ci = f" [{lo:+.4f}, {hi:+.4f}] ({level})" if s.decided else ""
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
