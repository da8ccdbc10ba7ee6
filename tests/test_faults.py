"""Faults at rest and during a trial, injected into real files of a real (tiny) study:
a torn journal tail, a truncated checkpoint, a damaged leaderboard row, a full disk."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.leaderboard import read_tree
from mdmsearch.search.study import repair_journal

REPO = Path(__file__).resolve().parents[1]
SPEC = {
    "study": "tiny",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 4, "eval_every": 2, "eval_examples": 16, "batch_size": 8, "n_samples": 0},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
    "hyper": {"process_lr": {"low": 0.001, "high": 0.1, "log": True}},  # continuous: no duplicates
    "baselines": ["vpsde"],
    "n_trials": 2,
}


def cli(cwd, *args, limit_file_size=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def limit():  # a write past the limit fails with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600, preexec_fn=limit if limit_file_size else None)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished 2-trial study under a relative studies/ (the tree can be copied)."""
    base = tmp_path_factory.mktemp("faults")
    (base / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    res = cli(base, "run", "spec.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    return base


@pytest.fixture
def copy(study_dir, tmp_path):
    dest = tmp_path / "study"
    shutil.copytree(study_dir, dest)
    return dest


def test_torn_journal_tail_is_backed_up_and_cut(copy):
    journal = copy / "studies" / "tiny" / "journal.log"
    good = journal.read_bytes()
    with open(journal, "ab") as fh:  # a writer killed mid-record
        fh.write(b'{"op_code": 6, "worker_id": "dead", "trial_id": 1, "us')
    res = cli(copy, "run", "spec.yaml", "--n-trials", "3")  # must not append to the torn record
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torn or damaged record" in res.stderr
    backups = list(journal.parent.glob("journal.log.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes().startswith(good)
    assert journal.read_bytes().startswith(good) and journal.read_bytes().endswith(b"\n")
    status = cli(copy, "status", "tiny", "--format", "json")
    assert status.returncode == 0 and json.loads(status.stdout)["counted"] == 3  # (duplicates do not count)


def test_glued_record_in_the_middle_is_cut_there(tmp_path):
    """A torn record followed by a complete one (the damage the repair prevents) is cut too."""
    path = tmp_path / "journal.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    optuna.create_study(study_name="s", storage=storage).enqueue_trial({"x": 1.0})
    good = path.read_bytes()
    path.write_bytes(good + b'{"op_code": 4, "tri' + b'{"op_code": 9}\n' + b'{"op_code": 9}\n')
    lock = optuna.storages.journal.JournalFileOpenLock(str(path))
    backup = repair_journal(path, lock)
    assert backup is not None and path.read_bytes() == good
    assert repair_journal(path, lock) is None  # sound now: nothing to do
    fresh = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    assert len(optuna.load_study(study_name="s", storage=fresh).trials) == 1


def test_truncated_checkpoint_is_set_aside_and_the_run_restarts(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--dataset", "gaussian", "--steps", "4", "--eval-every", "2", "--n-samples",
            "0", "-q"]
    assert cli(tmp_path, *args).returncode == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # cut short by a crash / disk error
    res = cli(tmp_path, *args[:-1], "--steps", "6", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cannot be loaded" in res.stderr and "moved aside" in res.stderr
    assert len(list(out.glob("checkpoint.pt.corrupt-*"))) == 1
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == 6
    history = pd.read_csv(out / "history.csv")
    assert list(history["step"]) == [2, 4, 6]  # from scratch: the old curve is gone with its checkpoint
    ev = cli(tmp_path, "evaluate", str(out), "--n", "8", "--n-t", "1")
    assert ev.returncode == 0, ev.stderr


def test_damaged_row_is_skipped_with_one_warning_and_rebuilt(copy):
    root = copy / "studies" / "leaderboard"
    before = read_tree(root).sort_values("trial").reset_index(drop=True)
    row = root / "dataset=digits" / "study=tiny" / "trial-1.parquet"
    row.write_bytes(row.read_bytes()[:100])
    board = cli(copy, "leaderboard", "--format", "json")
    assert board.returncode == 0, board.stderr[-3000:]
    warnings = [line for line in board.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "trial-1.parquet" in warnings[0] and "mdmsearch rebuild" in warnings[0]
    assert [r["trials"] for r in json.loads(board.stdout)] == ["0"]
    report = cli(copy, "report", "--out", "reports")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "trial-1.parquet" in report.stderr and (copy / "reports" / "digits" / "index.html").exists()
    rebuilt = cli(copy, "rebuild", "tiny")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert json.loads(rebuilt.stdout)["rows_written"] == [1]
    after = read_tree(root).sort_values("trial").reset_index(drop=True)
    for col in ("trial", "state", "val_bpd", "test_bpd", "steps", "config_hash", "structure_hash", "n_aux", "Q", "D",
                "process_lr", "artifact_dir", "n_params"):
        assert after[col].tolist() == before[col].tolist(), col
    board = cli(copy, "leaderboard")
    assert board.returncode == 0 and "unreadable" not in board.stderr


def test_full_disk_during_a_trial_fails_it_and_the_study_stays_usable(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    # checkpoints of the tiny U-Net are ~0.6 MB; the journal, rows and small files stay far below
    res = cli(tmp_path, "run", "spec.yaml", limit_file_size=200_000)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "2 of 2 decided trials FAILED" in last and "trials 0, 1" in last and "File too large" in last, last
    assert "Traceback" not in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["failed"] == 2
    rows = read_tree(tmp_path / "studies" / "leaderboard")
    assert rows["state"].tolist() == ["FAIL", "FAIL"]
    assert rows["reason"].str.contains("cannot write trial artifacts").all()
    status = cli(tmp_path, "status", "tiny")
    assert status.returncode == 0 and "FAILED: 2" in status.stdout and "finished: 0; counted toward n_trials: 2 of 2" in status.stdout
    again = cli(tmp_path, "run", "spec.yaml", "--n-trials", "3")  # space again: the study goes on
    assert again.returncode == 1  # it still holds the two FAILs, and says so
    counts = json.loads(again.stdout.strip().splitlines()[-1])
    assert counts["finished"] == 1 and counts["failed"] == 2, again.stderr[-3000:]
