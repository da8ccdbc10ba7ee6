"""Atomic writes (mdmsearch.io): whole files or none, damaged files set aside, and a module
that the leaderboard can use without training (no torch, no mdmsearch.training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mdmsearch.io import atomic_write, atomic_write_json, atomic_write_text, set_aside, write_parquet_atomic


def test_writes_replace_the_whole_file_and_leave_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_json_takes_tensors_and_paths_and_refuses_the_rest(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"q": torch.eye(2), "dir": tmp_path, "b": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"q": [[1.0, 0.0], [0.0, 1.0]], "dir": str(tmp_path), "b": 1}
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        atomic_write_json(tmp_path / "x.json", {"x": object()})
    assert not (tmp_path / "x.json").exists()


def test_parquet_and_set_aside(tmp_path):
    frame = pd.DataFrame({"split": ["val", "test"], "bpd": [1.0, 2.0]})
    write_parquet_atomic(frame, tmp_path / "p.parquet")
    assert pd.read_parquet(tmp_path / "p.parquet").equals(frame)
    dest = set_aside(tmp_path / "p.parquet", "damaged")
    assert not (tmp_path / "p.parquet").exists() and dest.name.startswith("p.parquet.corrupt-") and dest.exists()


def test_the_leaderboard_and_io_do_not_import_training():
    code = ("import sys, mdmsearch.io; assert 'torch' not in sys.modules, 'io imports torch'; "
            "import mdmsearch.leaderboard; assert 'mdmsearch.training' not in sys.modules, 'leaderboard imports training'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
