"""The documentation ships with the project and says true things: the example run config
trains, links resolve inside the repository, nothing points outside it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mdmsearch.config import load_run_config
from mdmsearch.search.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_run_configs_validate(path):
    load_run_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    load_spec(path)


def test_the_example_run_config_trains(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "train", str(REPO / "configs" / "digits_learned.yaml"),
                          "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "2", "--n-samples", "0", "-q"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == 2
    assert (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_stay_inside_the_project(path):
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to a missing {target}"


def test_math_note_covers_the_essentials():
    text = (REPO / "docs" / "math.md").read_text()
    for topic in ("skew-symmetric", "Van Loan", "ELBO", "t_min", "bpd", "Hurwitz", "controllab", "p(t)"):
        assert topic in text, topic
