"""`mdmsearch compare A B`: run directories and study trials (STUDY/N, STUDY/best, +seeds) on each
side, the model comparison with one run each, the structure comparison over seeds, --split,
--format json, and every bad reference as one error line (exit 2).  No training: the runs are
per_example.parquet + config.yaml files written here, with numbers known to the test."""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from scipy import stats

from mdmsearch.cli import build_parser, main
from mdmsearch.compare import PER_EXAMPLE_FILE, TIE, read_per_example, read_runs
from mdmsearch.errors import ConfigError
from mdmsearch.leaderboard import write_trial
from mdmsearch.search.promote import parse_trial_ref, trial_run_config
from mdmsearch.search.study import make_storage

REPO = Path(__file__).resolve().parents[1]
N_VAL, N_TEST = 150, 250
BASE = np.random.default_rng(0).normal(3.0, 0.5, N_VAL + N_TEST)  # per-example difficulty, shared by every run


def write_run(path: Path, seed: int, heldout: np.ndarray, data: str = "digits", n_val: int = N_VAL) -> Path:
    """A finished run: per-example BPDs (val = the first n_val, test = the rest; rows written
    test first to check the order) and the config.yaml keys compare reads."""
    path.mkdir(parents=True)
    frames = [pd.DataFrame({"split": "test", "index": np.arange(heldout.size - n_val), "bpd": heldout[n_val:], "n_t": 32}),
              pd.DataFrame({"split": "val", "index": np.arange(n_val), "bpd": heldout[:n_val], "n_t": 32})]
    pd.concat(frames, ignore_index=True).to_parquet(path / PER_EXAMPLE_FILE)
    config = {"data": {"name": data, "data_dir": None, "seed": 0, "n_train": None, "n_val": None, "n_test": None,
                       "download": False, "options": {}},
              "train": {"steps": 100, "seed": seed, "eval_seed": 12345}}
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bpd(shift: float, noise_seed: int, size: int = N_VAL + N_TEST) -> np.ndarray:
    """One run's per-example BPDs: the shared difficulty + a run-level shift + evaluation noise."""
    return BASE[:size] + shift + np.random.default_rng(noise_seed).normal(0, 0.005, size)


def cli(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", "compare", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture
def run_main(capsys):
    """``mdmsearch -q compare ...`` in this process: (exit code, stdout); logging restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*args):
        code = main(["-q", "compare", *map(str, args)])
        return code, capsys.readouterr().out

    with warnings.catch_warnings():
        yield run
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def means(arrays) -> np.ndarray:
    return np.array([a.mean() for a in arrays])


# ------------------------------------------------------------------------------ run directories
def test_one_run_each_gives_the_model_comparison_and_an_undecided_structure(tmp_path, run_main):
    a, b = bpd(-0.01, 1), bpd(0.0, 2)
    da, db = write_run(tmp_path / "a", 3, a), write_run(tmp_path / "b", 5, b)
    diff = a - b
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(diff.mean()) > 2 * se  # the test can fail: the model difference is clear

    code, out = run_main(da, db, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["a"] == {"refs": [str(da)], "seeds": [3], "runs": [str(da)]}
    assert doc["model"]["diff"] == pytest.approx(diff.mean()) and doc["model"]["se"] == pytest.approx(se)
    assert doc["model"]["n_examples"] == N_VAL + N_TEST and doc["model"]["verdict"] == "better"
    s = doc["structure"]
    assert s["verdict"] == "not decided (1 seed)" and s["se"] is None and s["df"] is None
    assert s["diff"] == pytest.approx(a.mean() - b.mean()) and s["n_seeds_a"] == s["n_seeds_b"] == 1

    code, text = run_main(da, db)
    lines = text.splitlines()
    assert code == 0 and lines[0] == f"A: {da} (seed 3; 1 run)" and lines[1] == f"B: {db} (seed 5; 1 run)"
    assert f"model: {diff.mean():+.4f} bpd, SE {se:.4f}" in text and "  verdict (model): better" in lines
    assert lines[-1] == "  verdict (structure): not decided (1 seed)" and "SE n/a, df n/a; 1 vs 1 seeds" in text


def test_same_configuration_seed_shift_is_a_tie_over_seeds(tmp_path, run_main):
    """Two groups of one configuration: a seed shifts a whole run, so the example-paired SE would
    call A better; over seeds (Welch, 2 + 2 seeds) it is a tie."""
    shift = {0: -0.02, 1: 0.0, 2: 0.01, 3: 0.03}
    runs = {s: bpd(shift[s], 10 + s) for s in shift}
    dirs = {s: write_run(tmp_path / f"r{s}", s, runs[s]) for s in shift}
    a, b = [runs[0], runs[1]], [runs[2], runs[3]]
    naive = np.mean(a, axis=0) - np.mean(b, axis=0)  # example-paired difference of the seed means
    assert abs(naive.mean()) > 2 * naive.std(ddof=1) / math.sqrt(naive.size)  # "better" by evaluation noise
    qa, qb = means(a).var(ddof=1) / 2, means(b).var(ddof=1) / 2
    se, df = math.sqrt(qa + qb), (qa + qb) ** 2 / (qa ** 2 + qb ** 2)
    diff = means(a).mean() - means(b).mean()
    assert abs(diff) <= stats.t.ppf(0.975, df) * se  # ... but within the seed-level noise

    code, out = run_main(f"{dirs[0]},{dirs[1]}", f"{dirs[2]},{dirs[3]}", "--format", "json")
    s = json.loads(out)["structure"]
    assert code == 0 and "model" not in json.loads(out)
    assert s["diff"] == pytest.approx(diff) and s["se"] == pytest.approx(se) and s["df"] == pytest.approx(df)
    assert s["verdict"] == TIE and not s["paired_by_seed"] and s["p_better"] == 1.0
    assert (s["n_seeds_a"], s["n_seeds_b"]) == (2, 2)

    code, text = run_main(f"{dirs[0]},{dirs[1]}", f"{dirs[2]},{dirs[3]}")
    h = stats.t.ppf(0.975, df) * se  # the 95% interval, printed next to the margin
    assert (f"structure: {diff:+.4f} [{diff - h:+.4f}, {diff + h:+.4f}] (95% CI) bpd, SE {se:.4f} (seed-level), "
            f"df {df:.1f}; 2 vs 2 seeds, not paired by seed") in text
    assert s["ci_low"] == pytest.approx(diff - h) and s["ci_high"] == pytest.approx(diff + h)
    assert text.splitlines()[-1] == f"  verdict (structure): {TIE}" and "verdict (model)" not in text


def test_a_real_difference_is_detected_paired_by_seed(tmp_path, run_main):
    seed_shift, interaction = {0: -0.02, 1: 0.01, 2: 0.03}, {0: 0.004, 1: -0.003, 2: 0.001}
    a = {s: bpd(seed_shift[s] - 0.1 + interaction[s], 20 + s) for s in seed_shift}
    b = {s: bpd(seed_shift[s], 30 + s) for s in seed_shift}
    da = ",".join(str(write_run(tmp_path / f"a{s}", s, a[s])) for s in a)
    db = ",".join(str(write_run(tmp_path / f"b{s}", s, b[s])) for s in b)
    d = np.array([a[s].mean() - b[s].mean() for s in (0, 1, 2)])
    se = d.std(ddof=1) / math.sqrt(3)
    assert abs(d.mean()) > stats.t.ppf(0.975, 2) * se

    code, out = run_main(da, db, "--format", "json")
    s = json.loads(out)["structure"]
    assert code == 0 and s["paired_by_seed"] and s["df"] == 2.0 and s["verdict"] == "better"
    assert s["diff"] == pytest.approx(d.mean()) and s["se"] == pytest.approx(se) and s["p_better"] == 1.0
    code, text = run_main(db, da)
    assert "3 vs 3 seeds, paired by seed; P(A<B) = 0.00" in text and text.splitlines()[-1] == "  verdict (structure): worse"


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)])
def test_a_run_set_compared_with_itself_is_a_tie_in_any_order(tmp_path, run_main, order):
    """Identical run sets (any order, paired: every per-seed difference is exactly 0) and the same
    runs given as different seeds' copies with a zero-spread shift of rounding size are ties; the
    means differ only by float rounding, which never decides."""
    shift = {0: -0.021, 1: 0.013, 2: 0.034}
    dirs = {s: write_run(tmp_path / f"v{s}", s, bpd(shift[s], 50 + s)) for s in shift}
    a = ",".join(str(dirs[s]) for s in (0, 1, 2))
    b = ",".join(str(dirs[s]) for s in order)
    code, out = run_main(a, b, "--format", "json")
    s = json.loads(out)["structure"]
    assert code == 0 and s["verdict"] == TIE and s["diff"] == 0.0 and s["paired_by_seed"]
    code, text = run_main(b, a)
    assert text.splitlines()[-1] == f"  verdict (structure): {TIE}"


def test_zero_spread_differences_decide_only_beyond_rounding():
    """Per-seed differences that are all equal (zero spread, SE 0): a rounding-sized difference is a
    tie, a real constant shift is decided."""
    from mdmsearch.compare import compare_structures

    base = {s: bpd(0.01 * s, 60 + s) for s in range(3)}
    tiny = {s: v + 1e-15 for s, v in base.items()}  # a shift of a few ulps of 3 bpd
    real = {s: v - 0.01 for s, v in base.items()}
    c = compare_structures(tiny, base)
    assert c.se == pytest.approx(0.0, abs=1e-15) and c.verdict == TIE
    assert compare_structures(real, base).verdict == "better"
    assert compare_structures(base, real).verdict == "worse"
    # unpaired (the seeds differ), the same runs in another order: the means agree to the bit
    shifted = {s + 10: base[s] for s in (2, 0, 1)}
    assert compare_structures(base, shifted).diff == 0.0 and compare_structures(base, shifted).verdict == TIE


def test_a_seed_counts_once_per_side(tmp_path, run_main):
    first, again, other = bpd(0.0, 40), bpd(0.5, 41), bpd(0.0, 42)
    d0, d0b, d1 = write_run(tmp_path / "x", 0, first), write_run(tmp_path / "y", 0, again), write_run(tmp_path / "z", 1, other)
    code, out = run_main(f"{d0},{d0b}", d1, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["a"]["seeds"] == [0] and doc["a"]["runs"] == [str(d0)] and "model" in doc
    assert doc["model"]["diff"] == pytest.approx((first - other).mean())


def test_split_selects_the_examples(tmp_path, run_main):
    """A is better on val and worse on test: --split val and test compare different examples."""
    a = BASE + np.r_[np.full(N_VAL, -0.05), np.full(N_TEST, 0.05)] + np.random.default_rng(50).normal(0, 0.005, BASE.size)
    b = bpd(0.0, 51)
    da, db = write_run(tmp_path / "a", 0, a), write_run(tmp_path / "b", 1, b)
    assert np.array_equal(read_per_example(da, "val"), a[:N_VAL]) and np.array_equal(read_per_example(da, "test"), a[N_VAL:])
    assert np.array_equal(read_per_example(da), a) and np.array_equal(read_per_example(da, split="heldout"), a)
    assert np.array_equal(read_runs([(0, da), (0, db)], split="test")[0], a[N_VAL:])  # first run of a seed
    with pytest.raises(ValueError, match="split"):
        read_per_example(da, "train")
    got = {}
    for split, lo, hi in (("val", 0, N_VAL), ("test", N_VAL, None), ("heldout", 0, None)):
        code, out = run_main(da, db, "--split", split, "--format", "json")
        doc = json.loads(out)
        assert code == 0 and doc["split"] == split
        assert doc["model"]["diff"] == pytest.approx((a[lo:hi] - b[lo:hi]).mean())
        assert doc["model"]["n_examples"] == doc["structure"]["n_examples"] == (hi or BASE.size) - lo
        got[split] = doc["model"]["verdict"]
    assert got == {"val": "better", "test": "worse", "heldout": "worse"}  # heldout: -0.05*150 + 0.05*250 > 0


def test_every_flag_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
    assert all(a.help for a in sub._actions if not isinstance(a, argparse._HelpAction))


# ------------------------------------------------------------------------------ study references
TRIALS = [  # (config_group, seed, value, outcome): trial n is the n-th entry
    ("g1", 0, 3.00, "COMPLETE"), ("g1", 1, 3.20, "COMPLETE"), ("g2", 0, 3.10, "COMPLETE"), ("g1", 2, 3.30, "COMPLETE"),
    ("g1", 0, 2.90, "DUPLICATE"), ("g1", 4, None, "FAIL"), ("g1", 1, 3.25, "COMPLETE"), ("g1", 3, 3.40, "PRUNED"),
]
SHIFT = {0: 0.0, 1: 0.02, 2: -0.01, 3: 0.05, 4: 0.0, 5: 0.0, 6: 0.3, 7: 0.1}  # trial -> run-level shift


def _add_trial(study, n: int, art: Path) -> None:
    group, seed, value, outcome = TRIALS[n]
    attrs = {"final": True, "outcome": outcome, "artifact_dir": str(art)}
    if outcome == "DUPLICATE":
        attrs["duplicate_of"] = 0
    if outcome == "FAIL":
        attrs["reason"] = "boom"
    state = {"FAIL": TrialState.FAIL, "PRUNED": TrialState.PRUNED}.get(outcome, TrialState.COMPLETE)
    study.add_trial(optuna.trial.create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                              user_attrs=attrs))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """studies/s1: trials of TRIALS with runs and leaderboard rows; studies/s2: one trained trial
    and no leaderboard.  Returns (studies dir, {trial: per-example BPDs})."""
    root = tmp_path_factory.mktemp("cmp") / "studies"
    (root / "s1").mkdir(parents=True)
    study = optuna.create_study(study_name="s1", storage=make_storage(f"journal:{root / 's1' / 'journal.log'}"))
    arrays = {}
    for n, (group, seed, value, outcome) in enumerate(TRIALS):
        art = root / "s1" / "trials" / str(n)
        _add_trial(study, n, art)
        if outcome in ("COMPLETE", "PRUNED"):
            arrays[n] = bpd(SHIFT[n], 100 + n)
            write_run(art, seed, arrays[n])
        write_trial(root / "leaderboard", "digits", "s1", {
            "trial": n, "state": outcome, "seed": seed, "config_group": group, "config_hash": f"{group}-{seed}",
            "artifact_dir": str(art), "val_bpd": value, "duplicate_of": 0 if outcome == "DUPLICATE" else None})
    (root / "s2").mkdir()
    other = optuna.create_study(study_name="s2", storage=make_storage(f"journal:{root / 's2' / 'journal.log'}"))
    write_run(root / "s2" / "trials" / "0", 0, bpd(0.0, 200))
    other.add_trial(optuna.trial.create_trial(value=3.0, user_attrs={
        "final": True, "outcome": "COMPLETE", "artifact_dir": str(root / "s2" / "trials" / "0")}))
    return root, arrays


def test_best_plus_seeds_is_every_seed_of_the_best_configuration(studies, tmp_path):
    root, arrays = studies
    res = cli(tmp_path, "s1/best+seeds", "s1/2", "--studies-dir", root, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1
    doc = json.loads(res.stdout)
    assert set(doc) == {"a", "b", "split", "structure"}  # no model comparison with 3 runs on a side
    # trial 0 (best COMPLETE; the duplicate 4 has a lower value), then g1's COMPLETE trials 1, 3 and
    # 6 (seed 1 again: the first run counts); not the FAIL 5 nor the PRUNED 7
    assert doc["a"]["refs"] == ["s1/best+seeds"] and doc["a"]["seeds"] == [0, 1, 2]
    assert doc["a"]["runs"] == [str(root / "s1" / "trials" / str(n)) for n in (0, 1, 3)]
    assert doc["b"] == {"refs": ["s1/2"], "seeds": [0], "runs": [str(root / "s1" / "trials" / "2")]}
    s = doc["structure"]
    assert s["diff"] == pytest.approx(means([arrays[0], arrays[1], arrays[3]]).mean() - arrays[2].mean())
    assert s["verdict"] == "not decided (1 seed)" and (s["n_seeds_a"], s["n_seeds_b"]) == (3, 1)
    assert s["p_better"] == pytest.approx(np.mean([arrays[n].mean() < arrays[2].mean() for n in (0, 1, 3)]))


def test_trial_references_resolve_like_promote(studies, run_main):
    root, arrays = studies
    code, out = run_main("s1/6+seeds", "s1/4", "--studies-dir", root, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["a"]["seeds"] == [1, 0, 2]  # trial 6 first, then trials 0, (1: seed 1 again), 3
    assert doc["a"]["runs"] == [str(root / "s1" / "trials" / str(n)) for n in (6, 0, 3)]
    assert doc["b"]["runs"] == [str(root / "s1" / "trials" / "0")]  # the duplicate answers as trial 0
    assert doc["structure"]["diff"] == pytest.approx(means([arrays[6], arrays[0], arrays[3]]).mean() - arrays[0].mean())
    code, out = run_main("s1/1", f"s1/3,{root / 's1' / 'trials' / '0'}", "--studies-dir", root, "--format", "json")
    doc = json.loads(out)  # mixed references on one side: Welch over seeds 1 vs {2, 0}
    assert code == 0 and doc["b"]["seeds"] == [2, 0] and doc["structure"]["n_seeds_b"] == 2


def test_from_trial_messages_are_unchanged(studies):
    root, _ = studies
    with pytest.raises(ConfigError, match=r"^--from-trial s1/5: trial 5 did not train \(FAIL: boom\)$"):
        trial_run_config("s1/5", root)
    with pytest.raises(ConfigError, match=r"^--from-trial: no study 'nope' under "):
        trial_run_config("nope/best", root)
    with pytest.raises(ConfigError, match=r"^--from-trial s1/8: study 's1' has trials 0\.\.7$"):
        trial_run_config("s1/8", root)
    with pytest.raises(ConfigError, match=r"^--from-trial 'aux3': expected STUDY/N \(a trial number\), STUDY/best or STUDY/baseline"):
        parse_trial_ref("aux3")
    _, where = trial_run_config("s1/best", root)
    assert where == "trial 0 of study s1 (val_bpd 3.0000)"


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    write_run(root / "short", 1, bpd(0.0, 301, size=300), n_val=100)
    write_run(root / "moons", 1, bpd(0.0, 302), data="moons")
    write_run(root / "noconfig", 1, bpd(0.0, 303))
    (root / "noconfig" / "config.yaml").unlink()
    return root


@pytest.mark.parametrize("a, b, message", [
    ("nostudy/0", "s1/0", "compare: no study 'nostudy' under "),
    ("s1/0", "s1/99", "compare s1/99: study 's1' has trials 0..7"),
    ("s1/5", "s1/0", "compare s1/5: trial 5 did not train (FAIL: boom)"),
    ("s1/0", "BAD/empty", "has no per_example.parquet"),
    ("s1/0", "BAD/short", "the runs cover different heldout examples"),
    ("s1/best,BAD/moons", "s1/2", "evaluated different held-out examples (data name 'digits' vs 'moons')"),
    ("s1/0", "BAD/noconfig", "config.yaml is missing"),
    ("s1/0", "no-such-run", "compare 'no-such-run': no such directory, and not STUDY/N, STUDY/best or STUDY/baseline"),
    ("s2/0+seeds", "s1/0", "compare s2/0+seeds: no leaderboard rows of study 's2' under "),
    ("s1/0", " , ", "compare: side B names no run"),
])
def test_a_bad_reference_is_one_error_line(studies, bad_runs, tmp_path, a, b, message):
    root, _ = studies
    a, b = (x.replace("BAD", str(bad_runs)) for x in (a, b))
    res = cli(tmp_path, a, b, "--studies-dir", root)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("mdmsearch: error: compare") and message in res.stderr, res.stderr
