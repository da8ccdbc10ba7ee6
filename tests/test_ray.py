"""The Ray Tune executor: a tiny study on a local Ray instance, SIGKILL of the driver and
resume, one leaderboard tree shared with the local executor, the driver's searcher, and Ray
being optional."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from mdmsearch.errors import MDMError
from mdmsearch.leaderboard import COLUMNS
from mdmsearch.search.spec import parse_spec
from mdmsearch.search.study import FINAL_ATTR, make_storage

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed")

TINY = {
    "study": "tiny-ray",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 30, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 4, "sample_steps": 5,
               "test_n_t": 4},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "median", "n_startup_trials": 2},
    "structure": {"n_aux": [0, 1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full", "aux", "last"]},
    "hyper": {"process_lr": [0.01, 0.03]},
    "baselines": ["vpsde", "cld"],
    "n_trials": 6,
    "workers": 2,
}
STATE_IN_STUDY = {"COMPLETE": "COMPLETE", "DUPLICATE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAIL",
                  "INVALID": "PRUNED"}


# ---------------------------------------------------------------------- helpers
def _ray_tmpdir() -> str:
    # short: Ray's unix sockets live under it (108-byte path limit)
    return tempfile.mkdtemp(prefix="mdmray", dir="/tmp")


def _env(ray_tmp: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": ray_tmp}


def _ray_pids(ray_tmp: str) -> list[int]:
    """Processes started for this RAY_TMPDIR (they inherit it; Ray renames its processes)."""
    needle = f"RAY_TMPDIR={ray_tmp}".encode()
    pids = []
    if not Path("/proc").is_dir():  # pragma: no cover - Linux only
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(proc.name))
    return pids


def _wait_no_ray(ray_tmp: str, timeout: float = 30.0) -> list[int]:
    deadline = time.time() + timeout
    pids = _ray_pids(ray_tmp)
    while pids and time.time() < deadline:
        time.sleep(0.5)
        pids = _ray_pids(ray_tmp)
    return pids


def _kill_ray(ray_tmp: str) -> None:
    """SIGKILL what a killed driver left behind (only processes of this RAY_TMPDIR, by pid)."""
    for pid in _ray_pids(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cmd(spec_path: Path, studies: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "mdmsearch.cli", "run", str(spec_path), "--studies-dir", str(studies), *extra]


def _run(cwd: Path, spec_path: Path, studies: Path, env: dict, *extra, timeout=600):
    return subprocess.run(_cmd(spec_path, studies, *extra), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def _counts(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _board(studies: Path, study: str):
    return pd.read_parquet(studies / "leaderboard" / "dataset=digits" / f"study={study}")


def _study(studies: Path, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=make_storage(f"journal:{studies / study / 'journal.log'}"))


def _check_board_matches_study(df, study: optuna.Study) -> None:
    """One row per decided trial, written once, with the state the study has."""
    assert df["trial"].is_unique
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    decided = {n for n, t in trials.items() if t.user_attrs.get(FINAL_ATTR)}
    assert set(df["trial"]) == decided
    for _, row in df.iterrows():
        expected = STATE_IN_STUDY[row["state"]]
        if row["state"] == "DUPLICATE" and pd.isna(row["val_bpd"]):
            expected = "PRUNED"  # a duplicate of a pruned trial is told as pruned again
        assert trials[row["trial"]].state.name == expected, row["trial"]
    assert not [t for t in trials.values() if t.state.name in ("RUNNING", "WAITING")]


# ---------------------------------------------------------------------- a tiny study on local Ray
@pytest.fixture(scope="module")
def ray_study(tmp_path_factory):
    """One Ray study (shared by the tests that only read it)."""
    root = tmp_path_factory.mktemp("raystudy")
    ray_tmp = _ray_tmpdir()
    try:
        spec = _write(root / "spec.yaml", TINY)
        proc = _run(root, spec, root / "studies", _env(ray_tmp), "--executor", "ray")
        leftovers = _wait_no_ray(ray_tmp)
    finally:
        _kill_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    yield {"root": root, "studies": root / "studies", "proc": proc, "leftovers": leftovers}


@pytest.mark.slow
@needs_ray
def test_tiny_study_with_ray(ray_study):
    proc, studies = ray_study["proc"], ray_study["studies"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = _counts(proc)
    # n_trials counts trials that trained or were rejected; a duplicate is answered without counting
    assert counts["finished"] - counts["duplicates"] == 6 and counts["running"] == 0 and counts["waiting"] == 0
    # every trial in the leaderboard, written by the Ray trials themselves
    df = _board(studies, "tiny-ray")
    assert sorted(df["trial"]) == list(range(counts["finished"]))
    assert set(df["executor"]) == {"ray"}
    assert set(df["baseline"].dropna()) == {"vpsde", "cld"}  # the enqueued baselines ran
    assert (df[df["baseline"].notna()]["state"] == "COMPLETE").all()  # ... to the end: never pruned
    assert (df["process"] == "learned").any()
    # the spec's Optuna pruner, as in a local run, pruned some trials; the trials recorded where
    pruned = df[df["state"] == "PRUNED"]
    assert len(pruned) >= 1 and (pruned["steps"] < 30).all()
    assert pruned["reason"].str.contains("pruned at step").all()
    done = df[df["state"] == "COMPLETE"]
    assert len(done) >= 1 and (done["steps"] == 30).all() and done["test_bpd"].notna().all()
    # ... and in the Optuna study, with the intermediate values at the real training steps
    study = _study(studies, "tiny-ray")
    _check_board_matches_study(df, study)
    # the same study attributes as a local run (status has its ETA), objective named
    assert study.user_attrs["n_trials"] == 6 and study.user_attrs["workers"] >= 1
    assert study.user_attrs["executor"] == "ray" and study.metric_names == ["val_bpd"]
    trained = set(df[df["state"].isin(["COMPLETE", "PRUNED"])]["trial"])
    for t in study.get_trials(deepcopy=False):
        if t.number in trained:  # (DUPLICATE and INVALID trials do not train)
            assert t.intermediate_values and set(t.intermediate_values) <= {10, 20, 30}
        if t.state.name == "PRUNED" and t.user_attrs.get("outcome") == "PRUNED":
            assert t.user_attrs["steps"] if "steps" in t.user_attrs else True
            assert max(t.intermediate_values) < 30  # stopped at an intermediate evaluation
    # the Tune experiments live with the study, one Tune trial per Optuna trial; checkpoints
    # live in the trials' artifact directories, as for local workers.  Usually one experiment;
    # a second one runs when trials still running as the searcher stopped asking ended as
    # duplicates (not counted) and left the study short of its n_trials
    tune_trials = [p.name for p in (studies / "tiny-ray" / "ray").glob("run-*/trial-*")]
    numbers = sorted(int(name.split("-")[1]) for name in tune_trials)
    assert numbers == sorted(t.number for t in study.trials)
    assert list((studies / "tiny-ray" / "trials").glob("*/checkpoint.pt"))
    # Ray was shut down cleanly: no process of that Ray instance is left
    assert ray_study["leftovers"] == []


@pytest.mark.slow
@needs_ray
def test_local_and_ray_results_share_one_leaderboard(ray_study):
    root, studies = ray_study["root"], ray_study["studies"]
    assert ray_study["proc"].returncode == 0, ray_study["proc"].stderr[-4000:]
    spec = _write(root / "local.yaml", dict(TINY, study="tiny-local", n_trials=3, workers=1,
                                             pruner={"name": "none"}))
    proc = _run(root, spec, studies, {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    tree = pd.read_parquet(studies / "leaderboard")
    tree["study"] = tree["study"].astype(str)
    assert set(tree["study"]) == {"tiny-ray", "tiny-local"}
    assert set(tree.groupby("study")["executor"].unique().map(tuple)) == {("ray",), ("local",)}
    assert set(COLUMNS) - {"dataset", "study"} <= set(tree.columns)
    files = sorted((studies / "leaderboard").rglob("*.parquet"))
    ray_rows = _counts(ray_study["proc"])["decided"]  # (6 counted + the duplicates answered)
    assert len(files) == ray_rows + 3 and len({str(pq.read_schema(f)) for f in files}) == 1
    # comparable: the same baseline config trains to the same result under both executors
    vp = tree[(tree["baseline"] == "vpsde") & (tree["state"] == "COMPLETE")]
    assert len(vp) == 2 and vp["config_hash"].nunique() == 1
    a, b = vp["val_bpd"].tolist()
    assert math.isclose(a, b, rel_tol=1e-4), (a, b)
    board = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "leaderboard", "--dataset", "digits",
                            "--root", str(studies / "leaderboard"), "--format", "json"],
                           capture_output=True, text=True, cwd=root)
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout.strip().splitlines()[0])
    assert any("tiny-ray" in str(r["studies"]) and "tiny-local" in str(r["studies"]) for r in rows)


# ---------------------------------------------------------------------- driver killed, command re-run
@pytest.mark.slow
@needs_ray
def test_driver_killed_then_resumed(tmp_path):
    ray_tmp = _ray_tmpdir()
    try:
        studies = tmp_path / "studies"
        spec = _write(tmp_path / "spec.yaml", dict(TINY, study="tiny-kill", n_trials=7))
        part = studies / "leaderboard" / "dataset=digits" / "study=tiny-kill"
        proc = subprocess.Popen(_cmd(spec, studies, "--executor", "ray"), cwd=tmp_path, env=_env(ray_tmp),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not list(part.glob("trial-*.parquet")):
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before the driver could be killed"
        assert list(part.glob("trial-*.parquet")), "no trial finished in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _kill_ray(ray_tmp)  # a SIGKILLed driver leaves Ray's agents behind
        first = {int(p.stem.split("-")[1]): pd.read_parquet(p)[["started_at", "finished_at"]].iloc[0].tolist()
                 for p in part.glob("trial-*.parquet")}
        assert len(first) < 7

        res = _run(tmp_path, spec, studies, _env(ray_tmp), "--executor", "ray")
        assert res.returncode == 0, res.stderr[-4000:]
        counts = _counts(res)
        assert counts["finished"] - counts["duplicates"] == 7  # (duplicates do not count toward n_trials)
        df = _board(studies, "tiny-kill")
        study = _study(studies, "tiny-kill")
        _check_board_matches_study(df, study)
        assert len(df) == counts["finished"] and (df["state"] == "DUPLICATE").sum() == counts["duplicates"]
        assert set(first) <= set(df["trial"])
        # finished trials were not rerun: their rows are still the ones written before the kill
        for n, times in first.items():
            assert pd.read_parquet(part / f"trial-{n}.parquet")[["started_at", "finished_at"]].iloc[0].tolist() == times
        # a trial cut short by the kill is retried from its checkpoint (once, its first attempt FAIL,
        # without a row), as after a dead local worker
        retries = df[df["retry_of"].notna()]
        for _, row in retries.iterrows():
            orig = study.trials[int(row["retry_of"])]
            assert orig.state.name == "FAIL" and int(row["retry_of"]) not in set(df["trial"])
        assert retries["retry_of"].is_unique
        if len(retries):
            assert "re-queued to resume from its checkpoint" in res.stderr
        exp = studies / "tiny-kill" / "ray"
        assert (exp / "run-1").is_dir() and (exp / "run-2").is_dir()  # one Tune experiment per run
        assert _wait_no_ray(ray_tmp) == []
    finally:
        _kill_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@needs_ray
def test_unexpected_trial_error_stops_the_ray_run(tmp_path):
    """Like the local executor: an unexpected exception in a trial ends the run with one line and
    exit status 2; the trial is FAIL in the study and not counted.  The error is the 'meta'
    device (tensors without values), which fails the same way on every machine, GPU or not."""
    ray_tmp = _ray_tmpdir()
    try:
        spec = _write(tmp_path / "spec.yaml", dict(TINY, study="tiny-err", n_trials=2, workers=1,
                                                    budget=dict(TINY["budget"], device="meta")))
        res = _run(tmp_path, spec, tmp_path / "studies", _env(ray_tmp), "--executor", "ray")
        assert res.returncode == 2, res.stderr[-3000:]
        assert "mdmsearch: error: a Ray trial raised an error" in res.stderr.strip().splitlines()[-1]
        study = _study(tmp_path / "studies", "tiny-err")
        failed = [t for t in study.trials if t.state.name == "FAIL"]
        assert len(failed) == 1 and not failed[0].user_attrs.get(FINAL_ATTR)
        assert not (tmp_path / "studies" / "leaderboard").exists()
        assert _wait_no_ray(ray_tmp) == []
    finally:
        _kill_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------- Ray is optional
def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch):
    from mdmsearch.search.ray_executor import run_ray

    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)
    spec = parse_spec(dict(TINY, studies_dir=str(tmp_path / "studies")))
    with pytest.raises(MDMError) as err:
        run_ray(spec)
    msg = str(err.value)
    assert msg == 'the Ray executor needs Ray: pip install -e ".[ray]"' and "\n" not in msg
    assert not (tmp_path / "studies").exists()  # nothing was created


# ---------------------------------------------------------------------- the driver's searcher
@pytest.fixture(autouse=True)
def _driver_beats_end_with_the_test():
    yield
    if HAVE_RAY:
        from mdmsearch.search.ray_executor import HELD

        HELD.release_all()


def _searcher(tmp_path, **over):
    from mdmsearch.search.lifecycle import Deadline
    from mdmsearch.search.ray_executor import StudySearcher, absolute_spec
    from mdmsearch.search.study import open_study

    spec = absolute_spec(parse_spec(dict(TINY, studies_dir=str(tmp_path / "studies"), **over)))
    open_study(spec)
    return spec, StudySearcher(spec, None, Deadline(spec.time_budget_s))


@needs_ray
def test_the_searcher_claims_trials_until_the_stop_rule(tmp_path):
    """The driver claims (asks) one Optuna trial per Tune trial, baselines first, with the local
    workers' claim (artifact dir + heartbeat) and stop rule; the trial samples its parameters."""
    import pickle

    from ray.tune.search import Searcher

    from mdmsearch.search.lifecycle import artifact_dir
    from mdmsearch.search.study import count_trials, is_stale

    spec, searcher = _searcher(tmp_path, n_trials=3)
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert configs[3] == Searcher.FINISHED  # 3 claimed trials count as running toward n_trials=3
    assert [c["mdm_number"] for c in configs[:3]] == [0, 1, 2]
    study = _study(tmp_path / "studies", "tiny-ray")
    trials = study.get_trials(deepcopy=False)
    assert [t.user_attrs.get("baseline") for t in trials] == ["vpsde", "cld", None]
    assert all(t.state.name == "RUNNING" and not is_stale(t) for t in trials)
    assert all((artifact_dir(spec, t) / "heartbeat.json").exists() for t in trials)
    assert trials[2].params == {}  # sampled by the trial itself, with the spec's sampler
    assert count_trials(study)["running"] == 3
    clone = pickle.loads(pickle.dumps(searcher))  # Tune pickles its search algorithm
    assert clone.suggest("t9") == Searcher.FINISHED


@needs_ray
def test_a_claimed_trial_waiting_for_resources_is_not_taken_for_dead(tmp_path, monkeypatch):
    """A Tune trial can wait PENDING for minutes on a busy cluster: the driver beats for its claim
    until Tune starts it, so another executor's recover() does not fail and re-queue it."""
    from ray.tune.experiment import Trial

    from mdmsearch.search import study as study_mod
    from mdmsearch.search.lifecycle import claim
    from mdmsearch.search.ray_executor import HELD, OutcomeLog
    from mdmsearch.search.study import is_stale, study_lock

    monkeypatch.setattr(study_mod, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(study_mod, "STALE_SECONDS", 0.5)
    spec, searcher = _searcher(tmp_path, n_trials=5)
    pending = searcher.suggest("t0")["mdm_number"]
    study = _study(tmp_path / "studies", "tiny-ray")
    with study_lock(spec):
        orphan = claim(study, spec).number  # claimed, then nobody beats for it

    def stale(number):
        return is_stale(study.get_trials(deepcopy=False)[number])

    time.sleep(1.0)  # twice STALE_SECONDS
    assert pending in HELD and not stale(pending)
    assert stale(orphan)
    OutcomeLog().on_trial_start(0, [], Trial("mdm", config={"mdm_number": pending}, stub=True))
    assert pending not in HELD  # its worker beats from here on; without one it goes stale
    time.sleep(1.0)
    assert stale(pending)


@needs_ray
def test_the_searcher_stops_at_the_time_budget(tmp_path):
    from ray.tune.search import Searcher

    spec, searcher = _searcher(tmp_path, n_trials=50)
    searcher.deadline.at = time.time() - 1
    assert searcher.suggest("t0") == Searcher.FINISHED
    trials = _study(tmp_path / "studies", "tiny-ray").trials
    assert trials and {t.state.name for t in trials} == {"WAITING"}  # the baselines are queued, nothing claimed


@pytest.mark.slow
@needs_ray
def test_time_budget_stops_asking_new_ray_trials(tmp_path):
    """--time-budget holds for Ray as for local workers: no new trial after the deadline, the
    running ones finish and are recorded (50 trials would take minutes)."""
    ray_tmp = _ray_tmpdir()
    try:
        spec = _write(tmp_path / "spec.yaml", dict(TINY, study="tiny-budget", n_trials=50, workers=1, baselines=[]))
        res = _run(tmp_path, spec, tmp_path / "studies", _env(ray_tmp), "--executor", "ray", "--time-budget", "10")
        assert res.returncode == 0, res.stderr[-3000:]
        assert _counts(res)["finished"] < 50
        trials = _study(tmp_path / "studies", "tiny-budget").trials
        assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
        assert _wait_no_ray(ray_tmp) == []
    finally:
        _kill_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@needs_ray
def test_a_cluster_address_that_never_answers_is_one_line_within_the_connect_timeout(tmp_path):
    """A port that accepts connections and says nothing (not a Ray head): ``ray.init`` would wait
    for ever; the run ends with one line after PROBE_TIMEOUT_S, exit 2, no study created."""
    import socket

    from mdmsearch.search.ray_executor import CONNECT_TIMEOUT_S, PROBE_TIMEOUT_S

    ray_tmp = _ray_tmpdir()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        spec = _write(tmp_path / "spec.yaml", dict(TINY, study="silent"))
        try:
            res = _run(tmp_path, spec, tmp_path / "studies", _env(ray_tmp), "--executor", "ray", "--address", address,
                       timeout=CONNECT_TIMEOUT_S + 90)
        finally:
            _kill_ray(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    # the gRPC handshake probe answers first (before ray.init): one line, nothing of Ray's own
    assert lines == [f"mdmsearch: error: --address {address}: no Ray cluster answered within {PROBE_TIMEOUT_S} s "
                     f"(the port accepts connections but says nothing)"], res.stderr[-3000:]
    assert not (tmp_path / "studies").exists()
