"""Command-line conventions: --version, global flags anywhere, -q/-v/--log-file, timestamps,
dependency warnings filtered, help on every flag, JSON outputs that parse as one document,
objective names and run attributes on the study."""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mdmsearch import __version__
from mdmsearch.cli import build_parser
from mdmsearch.leaderboard import write_trial
from mdmsearch.search.spec import parse_spec
from mdmsearch.search.study import FINAL_ATTR, OUTCOME_ATTR, count_trials, open_study, record_run

REPO = Path(__file__).resolve().parents[1]


def cli(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_version(tmp_path):
    res = cli(tmp_path, "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"mdmsearch {__version__}"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_and_argument_has_help():
    parser = build_parser()
    missing = []
    for name, sub in [("", parser), *_subparsers(parser).items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing, missing


@pytest.mark.parametrize("argv", [["-q", "status", "s"], ["status", "s", "-q"], ["status", "-q", "s"]])
def test_global_flags_anywhere(argv):
    args = build_parser().parse_args(argv + ["--log-file", "x.log", "-v"])
    assert args.quiet and args.verbose and args.log_file == "x.log" and args.study == "s"


def test_log_lines_have_timestamps_and_go_to_the_log_file(tmp_path, restore_logging):
    from mdmsearch.logs import setup_logging

    setup_logging(log_file=str(tmp_path / "run.log"))
    logging.getLogger("mdmsearch.test").info("hello")
    line = (tmp_path / "run.log").read_text().strip()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO mdmsearch.test: hello$", line), line
    setup_logging(quiet=True, log_file=str(tmp_path / "q.log"))
    logging.getLogger("mdmsearch.test").info("hidden")
    assert (tmp_path / "q.log").read_text() == ""


def test_optuna_experimental_warnings_are_filtered(restore_logging):
    from mdmsearch.logs import setup_logging

    def experimental_warnings():
        with warnings.catch_warnings(record=True) as caught:
            optuna.samplers.TPESampler(multivariate=True, group=True, seed=0)
        return [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]

    warnings.simplefilter("always")
    assert experimental_warnings()  # the warning exists (the test can fail) ...
    setup_logging()
    assert not experimental_warnings()  # ... and is filtered


def test_leaderboard_json_is_one_document_over_datasets(tmp_path):
    root = tmp_path / "lb"
    for i, dataset in enumerate(["digits", "moons"]):
        write_trial(root, dataset, "s", {"trial": i, "state": "COMPLETE", "val_bpd": 2.0 + i, "test_bpd": 2.1,
                                         "config_group": f"g{i}", "lr": 1e-3, "process_lr": 1e-2, "gamma": 0.01,
                                         "time_sampler": "vp", "baseline": "vpsde", "steps": 10, "seed": 0})
    res = cli(tmp_path, "leaderboard", "--root", str(root), "--format", "json")
    assert res.returncode == 0, res.stderr
    records = json.loads(res.stdout)
    assert [r["dataset"] for r in records] == ["digits", "moons"]


def test_status_json_counts_fails_apart_and_the_study_is_named(tmp_path):
    spec = parse_spec({"study": "st", "studies_dir": str(tmp_path / "studies"), "n_trials": 5, "workers": 2,
                       "baselines": []})
    study = open_study(spec)
    record_run(study, spec, "local")
    assert study.metric_names == ["val_bpd"]  # a dashboard shows val_bpd, not "Objective 0"
    for outcome, state, values in [("COMPLETE", TrialState.COMPLETE, [2.5]), ("INVALID", TrialState.PRUNED, None),
                                   ("FAIL", TrialState.FAIL, None)]:
        trial = study.ask()
        trial.set_user_attr(OUTCOME_ATTR, outcome)
        trial.set_user_attr(FINAL_ATTR, True)
        trial.set_user_attr("reason", f"because {outcome.lower()}")
        study.tell(trial, values, state=state if values is None else None)
    assert count_trials(study) == {"finished": 2, "failed": 1, "decided": 3, "duplicates": 0, "running": 0, "waiting": 0,
                                   "confirmation": 0, "total": 3}
    res = cli(tmp_path, "status", "st", "--studies-dir", str(tmp_path / "studies"), "--format", "json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["finished"] == 2 and info["failed"] == 1 and info["target"] == 5 and info["workers"] == 2
    assert info["failures"] == "trial 2: because fail" and info["best"]["trial"] == 0
    assert info["confirmation"] is None  # the spec asks for none
    assert info["states"] == {"COMPLETE": 1, "FAIL": 1, "INVALID": 1}  # mdmsearch's outcomes, INVALID apart
    text = cli(tmp_path, "status", "st", "--studies-dir", str(tmp_path / "studies"))
    assert "FAILED: 1 (trial 2: because fail)" in text.stdout and "finished: 2; counted toward n_trials: 3 of 5" in text.stdout
