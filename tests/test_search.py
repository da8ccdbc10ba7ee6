"""Outer loop: specs, a tiny study end to end, kill -9 and resume, two workers, leaderboards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from mdmsearch.leaderboard import COLUMNS

TINY = {
    "study": "tiny",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 30, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 4, "sample_steps": 5},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "structure": {"n_aux": [0, 1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full", "aux", "last"]},
    "hyper": {"process_lr": [0.01, 0.03]},
    "baselines": ["vpsde", "cld", "alda", "malda"],
    "n_trials": 7,
    "workers": 1,
}


def _write(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(tmp_path, spec_path, *extra, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", "run", str(spec_path), "--studies-dir",
                           str(tmp_path / "studies"), *extra], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def _board(tmp_path):
    return pd.read_parquet(tmp_path / "studies" / "leaderboard")


def test_tiny_study_end_to_end(tmp_path):
    spec = _write(tmp_path, TINY)
    proc = _run(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["finished"] == 7
    df = _board(tmp_path)
    assert len(df) == 7 and sorted(df["trial"]) == list(range(7))
    assert set(COLUMNS) - {"dataset", "study"} <= set(df.columns)
    assert set(df["dataset"].astype(str)) == {"digits"} and set(df["study"].astype(str)) == {"tiny"}
    assert set(df["baseline"].dropna()) == {"vpsde", "cld", "alda", "malda"}
    assert (df["process"] == "learned").any()
    done = df[df["state"] == "COMPLETE"]
    assert done["val_bpd"].notna().all() and done["test_bpd"].notna().all() and (done["steps"] == 30).all()
    # every file has the same schema and can be read alone
    files = sorted((tmp_path / "studies" / "leaderboard").rglob("*.parquet"))
    assert len(files) == 7 and len({str(pq.read_schema(f)) for f in files}) == 1
    curves = pd.read_parquet(tmp_path / "studies" / "leaderboard-curves")
    assert set(curves["trial"]) >= set(done["trial"])
    # artifacts of a finished trial
    art = Path(done.iloc[0]["artifact_dir"])
    for name in ("checkpoint.pt", "metrics.json", "qd.png", "samples.png", "history.csv"):
        assert (tmp_path / art / name).exists() or (art / name).exists(), name
    # the CLI views
    board = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "leaderboard", "--dataset", "digits", "--root",
                            str(tmp_path / "studies" / "leaderboard")], capture_output=True, text=True, cwd=tmp_path)
    assert board.returncode == 0 and "VPSDE" in board.stdout and "learned" in board.stdout
    status = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "status", "tiny", "--studies-dir",
                             str(tmp_path / "studies")], capture_output=True, text=True, cwd=tmp_path)
    assert status.returncode == 0 and "COMPLETE" in status.stdout and "best so far" in status.stdout
    # running again is a no-op: the study already has its trials
    again = _run(tmp_path, spec)
    assert again.returncode == 0 and len(_board(tmp_path)) == 7


def test_sigkill_mid_trial_then_resume(tmp_path):
    spec = dict(TINY, n_trials=6, budget=dict(TINY["budget"], steps=200, eval_every=20))
    path = _write(tmp_path, spec)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mdmsearch.cli", "run", str(path), "--studies-dir",
                             str(tmp_path / "studies")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "studies" / "tiny" / "trials" / "0" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "the first trial never checkpointed"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the journal still says RUNNING; the same command finishes the study
    res = _run(tmp_path, path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-queued to resume from its checkpoint" in res.stderr
    df = _board(tmp_path)
    assert len(df) == 6  # none lost, none duplicated
    assert df["trial"].is_unique
    retried = df[df["retry_of"].notna()]
    assert len(retried) == 1 and int(retried.iloc[0]["retry_of"]) == 0
    assert retried.iloc[0]["steps"] == 200
    assert "resumed from" in res.stderr
    for f in (tmp_path / "studies" / "leaderboard").rglob("*"):
        assert not f.name.endswith(".tmp")


def test_two_workers_share_one_study(tmp_path):
    spec = dict(TINY, n_trials=8, workers=2)
    res = _run(tmp_path, _write(tmp_path, spec))
    assert res.returncode == 0, res.stderr[-3000:]
    df = _board(tmp_path)
    assert len(df) == 8 and df["trial"].is_unique
    assert "w0" in res.stderr and "w1" in res.stderr  # both workers ran trials


def test_invalid_structure_costs_no_training_and_duplicates_are_not_retrained(tmp_path):
    base = dict(TINY, baselines=[], sampler={"name": "grid", "seed": 0}, hyper={},
                budget=dict(TINY["budget"], n_samples=0))
    # Q = 0 with noise on the auxiliaries only: x never moves, for both D patterns
    spec = dict(base, study="invalid", n_trials=2,
                structure={"n_aux": [2], "q_patterns": ["none"], "d_patterns": ["last", "aux"]})
    res = _run(tmp_path, _write(tmp_path, spec))
    assert res.returncode == 0, res.stderr[-3000:]
    df = _board(tmp_path)
    invalid = df[df["study"] == "invalid"]
    assert len(invalid) == 2 and (invalid["state"] == "INVALID").all()
    assert invalid["reason"].str.contains("controllab").all()
    for _, row in invalid.iterrows():
        assert not (Path(row["artifact_dir"]) / "checkpoint.pt").exists()
        assert row["wall_seconds"] < 5
    # a one-point grid asked three times: trained once, the repeats answered from the first
    spec = dict(base, study="dups", n_trials=3,
                structure={"n_aux": [2], "q_patterns": ["full"], "d_patterns": ["last"]})
    res = _run(tmp_path, _write(tmp_path, spec, "dups.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    df = _board(tmp_path)
    dups = df[df["study"] == "dups"].sort_values("trial")
    assert list(dups["state"]) == ["COMPLETE", "DUPLICATE", "DUPLICATE"]
    assert (dups["duplicate_of"].iloc[1:] == 0).all()
    assert (dups["val_bpd"] == dups["val_bpd"].iloc[0]).all()
    assert len(list((tmp_path / "studies" / "dups" / "trials").glob("*/checkpoint.pt"))) == 1


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (None, "invalid YAML"),
        (lambda s: s.update(bogus=1), "bogus"),
        (lambda s: s["budget"].update(steps=-5), "budget.steps"),
        (lambda s: s["structure"].update(n_aux=[]), "structure.n_aux"),
        (lambda s: s["data"].update(name="nope"), "unknown dataset"),
        (lambda s: s["structure"].update(n_aux=[1, 9]), "n_aux"),
        (lambda s: s["structure"].update(d_patterns=["wiggly"]), "unknown D pattern"),
    ],
)
def test_malformed_specs_fail_cleanly(tmp_path, mutate, needle):
    if mutate is None:
        path = tmp_path / "spec.yaml"
        path.write_text("study: x\nbudget: [unclosed\n")
    else:
        spec = json.loads(json.dumps(TINY))
        mutate(spec)
        path = _write(tmp_path, spec)
    res = _run(tmp_path, path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "studies").exists()


def test_unknown_key_error_names_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("study: x\ndata:\n  name: digits\n  colour: blue\n")
    res = _run(tmp_path, path)
    assert res.returncode == 2 and "data.colour (line 4): unknown key" in res.stderr


def test_changed_spec_is_refused(tmp_path):
    spec = dict(TINY, baselines=["vpsde"], n_trials=1)
    path = _write(tmp_path, spec)
    assert _run(tmp_path, path).returncode == 0
    spec["hyper"] = {"process_lr": [0.5]}
    _write(tmp_path, spec)
    res = _run(tmp_path, path)
    assert res.returncode == 2 and "different search space" in res.stderr
    assert _run(tmp_path, path, "--allow-spec-change").returncode == 0


@pytest.mark.parametrize("t_min,valid", [(1e-3, False), (2e-2, True)])
def test_structure_unfactorizable_at_t_min_is_invalid_before_training(t_min, valid):
    """Noise entering only at the end of a chain of 3 auxiliaries is controllable, but its
    covariances near t = 1e-3 are below float64 precision: rejected up front, with the fix."""
    from mdmsearch.diffusion import d_pattern, q_pattern
    from mdmsearch.search.plan import TrialPlan
    from mdmsearch.search.spec import SearchSpec

    spec = SearchSpec.model_validate(dict(TINY, budget=dict(TINY["budget"], t_min=t_min)))
    masks = [q_pattern("chain", 4).int().tolist(), d_pattern("last", 4).int().tolist()]
    hyper = {"lr": 2e-3, "process_lr": 1e-2, "gamma": 0.01, "beta_1": 10.0, "time_sampler": "vp"}
    check = TrialPlan(None, 0, 3, "chain", "last", "full", True, *masks, hyper).check(spec)
    assert check.valid is valid
    if not valid:
        assert "t_min" in check.reason and "not positive definite" in check.reason


def test_time_budget_stops_asking_new_trials(tmp_path):
    """The worker asks its first trial, then none after the deadline; what ran is recorded."""
    spec = _write(tmp_path, dict(TINY, study="budgeted", n_trials=50, baselines=[]))
    res = _run(tmp_path, spec, "--time-budget", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    finished = json.loads(res.stdout.strip().splitlines()[-1])["finished"]
    assert 1 <= finished < 50
    assert len(_board(tmp_path)) == finished
