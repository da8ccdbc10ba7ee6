"""A process killed at each boundary of a trial's end (row written, decided, told, released),
for the local and the Ray executors: every leaderboard row ends up agreeing with the study's
state for its trial (after a re-run locally; within the run on Ray, which restarts the trial),
and no trial whose row was written is trained again.

The kill is deterministic (``MDMSEARCH_FAILPOINT``, see mdmsearch/search/failpoints.py): the
process that reaches the boundary SIGKILLs itself there, as ``kill -9`` would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.search.failpoints import ENV, TrialEnd
from mdmsearch.search.study import FINAL_ATTR, heartbeat_path, make_storage

SPEC = {
    "study": "crash",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 10, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
               "test_n_t": 4},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
    "baselines": ["vpsde"],
    "n_trials": 2,
    "workers": 1,
}
STATE_IN_STUDY = {"COMPLETE": "COMPLETE", "DUPLICATE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAIL",
                  "INVALID": "PRUNED"}
HAVE_RAY = __import__("importlib").util.find_spec("ray") is not None


def _run(tmp_path: Path, env: dict, *extra) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    cmd = [sys.executable, "-m", "mdmsearch.cli", "run", str(spec), "--studies-dir", str(tmp_path / "studies"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="crash", storage=make_storage(f"journal:{tmp_path / 'studies/crash/journal.log'}"))


def _rows(tmp_path: Path) -> pd.DataFrame:
    part = tmp_path / "studies" / "leaderboard" / "dataset=digits" / "study=crash"
    return pd.concat([pd.read_parquet(p) for p in sorted(part.glob("trial-*.parquet"))], ignore_index=True)


def _assert_agree(df: pd.DataFrame, study: optuna.Study) -> None:
    """One row per decided trial, none for another, each with the state the study has."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert df["trial"].is_unique
    assert set(df["trial"]) == {n for n, t in trials.items() if t.user_attrs.get(FINAL_ATTR)}
    for _, row in df.iterrows():
        t = trials[row["trial"]]
        expected = "PRUNED" if row["state"] == "DUPLICATE" and pd.isna(row["val_bpd"]) else STATE_IN_STUDY[row["state"]]
        assert t.state.name == expected and t.user_attrs.get("outcome") == row["state"], row["trial"]
        if row["state"] == "COMPLETE":
            assert t.values == [row["val_bpd"]] and t.user_attrs["test_bpd"] == row["test_bpd"]
            assert t.user_attrs["steps"] == row["steps"]
    assert not [t for t in trials.values() if t.state.name in ("RUNNING", "WAITING")]


def _finished_and_agreeing(tmp_path: Path, proc: subprocess.CompletedProcess):
    """The run ended well with both trials decided, and every row agrees with the study."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["finished"] == 2 and counts["failed"] == 0 and counts["running"] == 0
    study, df = _study(tmp_path), _rows(tmp_path)
    _assert_agree(df, study)
    return study, df


def _crash_then_rerun(tmp_path: Path, env: dict, boundary: TrialEnd) -> None:
    crashed = _run(tmp_path, {**env, ENV: boundary.value})
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert f"failpoint {boundary.value}: killing process" in crashed.stderr
    # the moment of death, as the study and the disk hold it: trial 0 (the baseline) ended
    # up to `boundary`, and not one write further
    study = _study(tmp_path)
    first = study.trials[0]
    row = _rows(tmp_path).set_index("trial").loc[0]
    told = boundary in (TrialEnd.TOLD, TrialEnd.RELEASED)
    assert first.state.name == ("COMPLETE" if told else "RUNNING")
    assert bool(first.user_attrs.get(FINAL_ATTR)) == (boundary != TrialEnd.ROW_WRITTEN)
    assert heartbeat_path(Path(first.user_attrs["artifact_dir"])).exists() == (boundary != TrialEnd.RELEASED)
    assert row["state"] == "COMPLETE"

    again = _run(tmp_path, env)
    study, df = _finished_and_agreeing(tmp_path, again)
    after = df.set_index("trial").loc[0]
    # the crashed trial was told from its row, not trained again: its row is the one it wrote
    assert (after["started_at"], after["finished_at"], after["val_bpd"]) == (
        row["started_at"], row["finished_at"], row["val_bpd"])
    assert df["retry_of"].isna().all() and len(study.trials) == 2
    assert "re-queued" not in again.stderr
    if not told:
        assert "told COMPLETE from the row" in again.stderr


@pytest.mark.parametrize("boundary", list(TrialEnd), ids=str)
def test_local_worker_killed_at_each_boundary_of_a_trials_end(tmp_path, boundary):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop(ENV, None)
    _crash_then_rerun(tmp_path, env, boundary)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed")
@pytest.mark.parametrize("boundary", list(TrialEnd), ids=str)
def test_ray_trial_killed_at_each_boundary_of_a_trials_end(tmp_path, boundary):
    """The Ray worker that runs a trial dies at the boundary (every trial's, as the failpoint is
    set for the whole run); Tune restarts the trial as the same Optuna trial, which is told from
    its row (or found told already) instead of training again: had it trained again, it would
    have died at the same boundary again, until Tune gave up and the run failed.  So the run
    itself finishes, every row agrees with the study, nothing is re-queued, and a re-run has
    nothing left to do."""
    ray_tmp = tempfile.mkdtemp(prefix="mdmray", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": ray_tmp}
    env.pop(ENV, None)
    try:
        crashed = _run(tmp_path, {**env, ENV: boundary.value}, "--executor", "ray")
        study, df = _finished_and_agreeing(tmp_path, crashed)
        assert df["retry_of"].isna().all() and len(study.trials) == 2
        again = _run(tmp_path, env, "--executor", "ray")
        assert again.returncode == 0 and len(_study(tmp_path).trials) == 2, again.stderr[-3000:]
        assert _rows(tmp_path).equals(df)
    finally:
        for pid in _pids_with_env(f"RAY_TMPDIR={ray_tmp}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _pids_with_env(needle: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle.encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_an_unset_failpoint_does_nothing(monkeypatch):
    from mdmsearch.search.failpoints import failpoint

    monkeypatch.delenv(ENV, raising=False)
    for boundary in TrialEnd:
        failpoint(boundary)
    monkeypatch.setenv(ENV, "no-such-boundary")
    failpoint(TrialEnd.ROW_WRITTEN)
