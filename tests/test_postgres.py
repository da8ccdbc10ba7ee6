"""A study in a real PostgreSQL server (a throwaway one per test module, tests/pgserver.py):
several local workers and a Ray run on one study, a kill storm and re-runs (nothing lost,
nothing trained twice), status/leaderboard/report/rebuild against it, liveness through the
database alone, and a database that refuses or does not answer: one line, exit 2, nothing
created."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from pgserver import PgServer, missing_reason

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")

SPEC = {
    "study": "pg",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 10, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 4,
               "sample_steps": 5, "test_n_t": 4},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full", "last"]},
    "baselines": ["vpsde"],
    "n_trials": 4,
    "workers": 2,
}


@pytest.fixture(scope="module")
def server():
    pg = PgServer().start()
    yield pg
    pg.stop()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(Path(__file__).parents[1])}


def _cli(cwd: Path, *args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=_env(), **kw)


def _spec(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return path


def _rows(studies: Path, study: str) -> pd.DataFrame:
    part = studies / "leaderboard" / "dataset=digits" / f"study={study}"
    files = sorted(part.glob("trial-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True) if files else pd.DataFrame()


def _study(url: str, name: str) -> optuna.Study:
    from mdmsearch.search.study import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(url))


def _check_agree(df: pd.DataFrame, study: optuna.Study) -> None:
    """One row per decided trial, none twice, each with its trial's outcome; nothing left running."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    decided = {n for n, t in trials.items() if t.user_attrs.get("final")}
    assert df["trial"].is_unique and set(df["trial"]) == decided
    for _, row in df.iterrows():
        assert trials[row["trial"]].user_attrs["outcome"] == row["state"], row["trial"]
    assert not [n for n, t in trials.items() if t.state.name in ("RUNNING", "WAITING")]


# ---------------------------------------------------------------------- a shared study
@pytest.fixture(scope="module")
def pg_study(server, tmp_path_factory):
    """A 2-worker local study of 4 trials in PostgreSQL (read by the tests below)."""
    root = tmp_path_factory.mktemp("pgstudy")
    url = server.create_db("shared")
    proc = _cli(root, "run", _spec(root / "spec.yaml"), "--storage", url, "--studies-dir", root / "studies")
    return {"root": root, "url": url, "proc": proc, "studies": root / "studies"}


def test_local_workers_share_one_postgres_study(pg_study):
    proc = pg_study["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["decided"] >= 4 and counts["failed"] == 0
    study = _study(pg_study["url"], "pg")
    df = _rows(pg_study["studies"], "pg")
    _check_agree(df, study)
    assert df["executor"].eq("local").all() and df["baseline"].eq("vpsde").any()
    # liveness lived in the database: no heartbeat file was ever needed next to the artifacts
    assert not list(pg_study["studies"].rglob("heartbeat.json"))
    beats = [t.user_attrs.get("heartbeat") for t in study.trials if t.user_attrs.get("outcome") == "COMPLETE"]
    assert beats and all(b and b["pid"] > 0 for b in beats)


def test_status_rebuild_leaderboard_and_report_read_the_postgres_study(pg_study, tmp_path):
    root, url, studies = pg_study["root"], pg_study["url"], pg_study["studies"]
    status = _cli(root, "status", "pg", "--storage", url, "--studies-dir", studies, "--format", "json")
    assert status.returncode == 0, status.stderr[-2000:]
    info = json.loads(status.stdout)
    assert info["finished"] >= 4 and info["failed"] == 0 and info["running"] == 0
    board = _cli(root, "leaderboard", "--root", studies / "leaderboard", "--format", "json")
    assert board.returncode == 0 and len(json.loads(board.stdout)) >= 1
    before = _rows(studies, "pg").sort_values("trial").reset_index(drop=True)
    for p in (studies / "leaderboard" / "dataset=digits" / "study=pg").glob("trial-*.parquet"):
        p.unlink()  # lost rows: rebuilt from the study in PostgreSQL and the trials' artifacts
    rebuilt = _cli(root, "rebuild", "pg", "--storage", url, "--studies-dir", studies)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    after = _rows(studies, "pg").sort_values("trial").reset_index(drop=True)
    assert list(after["trial"]) == list(before["trial"]) and list(after["state"]) == list(before["state"])
    out = tmp_path / "reports"
    report = _cli(root, "report", "--root", studies / "leaderboard", "--studies-dir", studies, "--storage", url,
                  "--out", out)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (out / "digits" / "README.md").read_text()
    assert "not found" not in text and "postgresql+psycopg://mdm:***@" in text  # read, password never shown


# ---------------------------------------------------------------------- liveness in the database
def test_a_running_trial_beats_into_the_database_and_a_dead_one_is_recovered(server, tmp_path, monkeypatch):
    """With a database storage a trial's beat is a record in the study: a worker on another
    machine (another host name, no shared file system) tells the live trial from the dead one."""
    from mdmsearch.search import lifecycle
    from mdmsearch.search import study as study_mod
    from mdmsearch.search.record import TrialRecord
    from mdmsearch.search.spec import SearchSpec

    monkeypatch.setattr(study_mod, "HEARTBEAT_SECONDS", 0.05)
    url = server.create_db("beats")
    spec = SearchSpec.model_validate({"study": "beats", "studies_dir": str(tmp_path / "studies"), "storage": url})
    study = study_mod.open_study(spec)
    with study_mod.study_lock(spec):
        live, dead = lifecycle.claim(study, spec), lifecycle.claim(study, spec)  # (trial 0: a baseline)
    beat = study_mod.Heartbeat(Path(tmp_path), live.number, study, live._trial_id).start()
    try:
        first = TrialRecord.of(_study(url, "beats").trials[live.number]).heartbeat["time"]
        time.sleep(0.3)
        elsewhere = _study(url, "beats")  # a new connection, as another machine has
        rec = TrialRecord.of(elsewhere.trials[live.number])
        assert rec.heartbeat["time"] > first and rec.heartbeat["pid"] == os.getpid()
        assert not list(Path(tmp_path).rglob("heartbeat.json"))
        monkeypatch.setattr(socket, "gethostname", lambda: "another-machine")  # pids mean nothing there
        later = time.time() + study_mod.STALE_SECONDS / 2
        assert not study_mod.is_stale(rec, now=later)
        dead_rec = TrialRecord.of(elsewhere.trials[dead.number])
        assert not study_mod.is_stale(dead_rec)  # just claimed
        assert study_mod.is_stale(dead_rec, now=dead_rec.heartbeat["time"] + study_mod.STALE_SECONDS + 1)
    finally:
        beat.stop()


# ---------------------------------------------------------------------- refusing or silent servers
@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


SAYS = {"password": "refused user 'mdm' (wrong user or password)", "database": "database 'nope' does not exist",
        "refused": "connection refused", "silent": "no answer from 127.0.0.1"}


@pytest.mark.parametrize("command, case", [("run", case) for case in SAYS] + [
    (command, case) for command in ("status", "report") for case in ("password", "database", "refused")])
def test_a_database_that_refuses_is_one_line_and_nothing_is_created(server, silent_port, tmp_path, case, command):
    from pgserver import free_port

    says = SAYS[case]
    url = {"password": server.url(password="wrong"), "database": server.url(db="nope"),
           "refused": server.url(port=free_port()), "silent": server.url(port=silent_port)}[case]
    studies = tmp_path / "studies"
    args = {"run": ["run", _spec(tmp_path / "spec.yaml"), "--storage", url, "--studies-dir", studies],
            "status": ["status", "pg", "--storage", url, "--studies-dir", studies],
            "report": ["report", "--storage", url, "--root", studies / "leaderboard", "--out", tmp_path / "out"]}
    res = _cli(tmp_path, *args[command], timeout=60)  # (a hang fails here: the connect timeout is 10 s)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert says in lines[0] and "wrong" not in lines[0].replace("wrong user", "")  # never the password
    assert not studies.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- a kill storm
def _run_killed_after(cwd: Path, args: list, seconds: float) -> None:
    """Start `mdmsearch run` in its own process group and SIGKILL the whole group after ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-m", "mdmsearch.cli", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_kill_storm_on_postgres_loses_nothing_and_trains_nothing_twice(server, tmp_path):
    """Three SIGKILLs of every process of a 2-worker run (driver and workers), then a re-run to
    the end: every decided trial has one row, nothing is left running, and no configuration was
    trained to completion twice (a killed trial resumes from its checkpoint as a retry)."""
    url = server.create_db("storm")
    # a grid over 16 configurations (the random sampler proposes tried ones again: duplicates)
    spec = _spec(tmp_path / "spec.yaml", study="storm", n_trials=10, sampler={"name": "grid"},
                 structure={"n_aux": [1, 2, 3], "q_patterns": ["full", "chain"], "d_patterns": ["full", "last"]},
                 hyper={"process_lr": [0.01, 0.03]}, budget=dict(SPEC["budget"], steps=300, eval_every=50))
    args = ["run", spec, "--storage", url, "--studies-dir", tmp_path / "studies"]
    kills = 0
    for seconds in (20, 25, 20):
        _run_killed_after(tmp_path, args, seconds)
        kills += 1
    final = _cli(tmp_path, *args, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    study = _study(url, "storm")
    df = _rows(tmp_path / "studies", "storm")
    _check_agree(df, study)
    trained = df[df["state"] == "COMPLETE"]
    twice = int(trained["config_hash"].duplicated().sum())
    retries = sum(1 for t in study.trials if t.user_attrs.get("retry_of") is not None)
    figures = {"kills": kills, "trials": len(study.trials), "rows": len(df), "decided": int(df["trial"].nunique()),
               "retried": retries, "duplicates": int((df["state"] == "DUPLICATE").sum()), "trained_twice": twice}
    print("kill storm:", json.dumps(figures))
    assert twice == 0 and len(df) - int((df["state"] == "DUPLICATE").sum()) >= 10 and retries >= 1


@pytest.mark.slow
def test_a_ray_run_and_local_workers_share_one_postgres_study(server, tmp_path):
    pytest.importorskip("ray")
    import tempfile

    url = server.create_db("mixed")
    ray_tmp = tempfile.mkdtemp(prefix="mdmray", dir="/tmp")
    spec = _spec(tmp_path / "spec.yaml", study="mixed", n_trials=3)
    env = {**_env(), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    ray_run = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "run", str(spec), "--storage", url,
                              "--studies-dir", str(tmp_path / "studies"), "--executor", "ray"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    local = _cli(tmp_path, "run", spec, "--storage", url, "--studies-dir", tmp_path / "studies", "--n-trials", 5)
    assert local.returncode == 0, local.stderr[-3000:]
    df = _rows(tmp_path / "studies", "mixed")
    _check_agree(df, _study(url, "mixed"))
    assert set(df["executor"]) == {"ray", "local"}
    assert not list((tmp_path / "studies").rglob("heartbeat.json"))


def test_a_bare_postgresql_url_uses_the_installed_psycopg(server, tmp_path):
    """`postgresql://` means psycopg2 to SQLAlchemy; with only psycopg (3) installed, as the
    `postgres` extra does, the URL is taken with that driver instead of failing."""
    import importlib.util

    from mdmsearch.preflight import normalize_storage

    if importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed: a bare postgresql:// URL uses it")
    bare = server.url().replace("postgresql+psycopg://", "postgresql://")
    assert normalize_storage(bare, None) == server.url()
