"""Outer loop: specs, a tiny study end to end, kill -9 and resume, two workers, leaderboards."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from collections import Counter

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from mdmsearch.leaderboard import COLUMNS

TINY = {
    "study": "tiny",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 30, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 4, "sample_steps": 5,
               "test_n_t": 4},
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


def _study(tmp_path, name, storage=None):
    from mdmsearch.search.study import make_storage

    url = storage or f"journal:{tmp_path / 'studies' / name / 'journal.log'}"
    return optuna.load_study(study_name=name, storage=make_storage(url))


def _study_states(study) -> dict:
    return dict(Counter(t.state.name for t in study.trials))


STATE_IN_STUDY = {"COMPLETE": "COMPLETE", "DUPLICATE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "FAIL",
                  "INVALID": "PRUNED"}


def _assert_board_matches_study(df, study) -> None:
    """Every decided trial of the study has exactly its row, with the state the study has."""
    trials = {t.number: t for t in study.trials}
    decided = {n for n, t in trials.items() if t.user_attrs.get("final")}
    assert sorted(df["trial"]) == sorted(decided)
    for _, row in df.iterrows():
        expected = STATE_IN_STUDY[row["state"]]
        if row["state"] == "DUPLICATE" and pd.isna(row["val_bpd"]):
            expected = "PRUNED"  # a duplicate of a pruned trial is told as pruned again
        assert trials[row["trial"]].state.name == expected, row["trial"]
    assert not [t for t in trials.values() if t.state.name in ("RUNNING", "WAITING")]


def _assert_trained_once(tmp_path, df, study="tiny") -> None:
    """Each configuration was trained once: a repeat that started after the first run had
    finished is a DUPLICATE answered from it (only concurrent repeats can both train), and
    every trained row has its own checkpoint."""
    trained = df[df["state"].isin(["COMPLETE", "PRUNED"])]
    assert len(trained) >= 1
    for _, group in trained.groupby("config_hash"):
        group = group.sort_values("started_at")
        for i in range(1, len(group)):
            assert group.iloc[i]["started_at"] < group.iloc[:i]["finished_at"].max(), group[["trial", "state"]]
    for _, row in df[df["state"] == "DUPLICATE"].iterrows():
        first = df[df["trial"] == row["duplicate_of"]].iloc[0]
        assert first["state"] == "COMPLETE" and first["config_hash"] == row["config_hash"]
        assert first["finished_at"] <= row["started_at"]
    assert trained["artifact_dir"].is_unique
    for art in trained["artifact_dir"]:
        assert (Path(art) / "checkpoint.pt").exists(), art
    ckpts = list((tmp_path / "studies" / study / "trials").glob("*/checkpoint.pt"))
    assert len(ckpts) == len(trained)


@pytest.mark.slow
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
    assert status.returncode == 0 and "COMPLETE" in status.stdout and "winner (search only, not confirmed): learned" in status.stdout
    # running again is a no-op: the study already has its trials
    again = _run(tmp_path, spec)
    assert again.returncode == 0 and len(_board(tmp_path)) == 7


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(tmp_path):
    spec = dict(TINY, n_trials=6, budget=dict(TINY["budget"], steps=100, eval_every=20))
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
    time.sleep(0.2)  # (its 80 remaining steps take about a second)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the journal still says RUNNING; the same command finishes the study
    res = _run(tmp_path, path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-queued to resume from its checkpoint" in res.stderr
    df = _board(tmp_path)
    assert len(df) == 6  # none lost, none duplicated
    retried = df[df["retry_of"].notna()]
    assert len(retried) == 1 and int(retried.iloc[0]["retry_of"]) == 0
    assert retried.iloc[0]["steps"] == 100
    assert "resumed from" in res.stderr
    # the study itself: the killed trial is FAIL (not counted), everything else decided once
    study = _study(tmp_path, "tiny")
    by_state = _study_states(study)
    assert by_state == {"FAIL": 1, "COMPLETE": 6}, by_state
    assert set(df["trial"]) == {t.number for t in study.trials if t.user_attrs.get("final")}
    assert 0 not in set(df["trial"])  # trial 0 is the killed one, its retry carries its row
    _assert_trained_once(tmp_path, df)
    # the retry replayed the killed run's learning curve to the pruner before continuing: it
    # reported every evaluation step, including those done before the kill
    retry = study.trials[int(retried.iloc[0]["trial"])]
    assert sorted(retry.intermediate_values) == list(range(20, 101, 20))
    for f in (tmp_path / "studies" / "leaderboard").rglob("*"):
        assert not f.name.endswith(".tmp")


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    spec = dict(TINY, n_trials=8, workers=2)
    res = _run(tmp_path, _write(tmp_path, spec))
    assert res.returncode == 0, res.stderr[-3000:]
    df = _board(tmp_path)
    assert "w0" in res.stderr and "w1" in res.stderr  # both workers ran trials
    # the study: exactly 8 trials asked and decided (no over-asking by the second worker), no
    # trial left running or waiting, and the board agrees with the study trial by trial
    study = _study(tmp_path, "tiny")
    assert len(study.trials) == 8 and all(t.user_attrs.get("final") for t in study.trials)
    _assert_board_matches_study(df, study)
    assert set(df["baseline"].dropna()) == {"vpsde", "cld", "alda", "malda"}  # each baseline once
    assert df["baseline"].dropna().is_unique
    _assert_trained_once(tmp_path, df)
    assert not list((tmp_path / "studies" / "tiny" / "trials").glob("*/heartbeat.json"))  # told: released


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
    # Q patterns full and chain alias at K = 1: the grid's second point repeats the first and is
    # answered from it (not trained, not counted); the third is new and trained
    spec = dict(base, study="dups", n_trials=2, hyper={"process_lr": [0.01, 0.03]},
                structure={"n_aux": [1], "q_patterns": ["full", "chain"], "d_patterns": ["last"]})
    res = _run(tmp_path, _write(tmp_path, spec, "dups.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    df = _board(tmp_path)
    dups = df[df["study"] == "dups"].sort_values("trial")
    assert list(dups["state"]) == ["COMPLETE", "DUPLICATE", "COMPLETE"]
    assert list(dups["q_pattern"]) == ["full", "chain", "chain"] and list(dups["process_lr"]) == [0.03, 0.03, 0.01]
    assert int(dups["duplicate_of"].iloc[1]) == 0 and dups["val_bpd"].iloc[1] == dups["val_bpd"].iloc[0]
    assert len(list((tmp_path / "studies" / "dups" / "trials").glob("*/checkpoint.pt"))) == 2
    assert _study_states(_study(tmp_path, "dups")) == {"COMPLETE": 3}
    # the ranked leaderboard counts the configuration's training runs, not its answers
    from mdmsearch.leaderboard import ranked

    board = ranked(dups.assign(dataset="digits"))
    first = board[board["trials"].astype(str).str.startswith("0")]
    assert len(board) == 2 and int(first.iloc[0]["n"]) == 1 and first.iloc[0]["trials"] == "0"
    assert math.isnan(first.iloc[0]["val_std"])


def test_a_configuration_in_training_elsewhere_is_not_trained_twice(tmp_path):
    """Two workers proposing the same point at once (aux3 with 2 workers: 2 of 28 trained trials
    were such twins): the later one is answered as a duplicate, without a value and without
    training, told as pruned, and does not count toward n_trials."""
    from mdmsearch.search.lifecycle import claim
    from mdmsearch.search.plan import suggest_plan
    from mdmsearch.search.runner import run_claimed
    from mdmsearch.search.spec import parse_spec
    from mdmsearch.search.study import budget_used, count_trials, open_study

    spec = parse_spec(dict(TINY, study="twins", baselines=["vpsde"], studies_dir=str(tmp_path / "studies")))
    study = open_study(spec)
    first = claim(study, spec)  # the enqueued baseline, being trained by "another worker"
    first.set_user_attr("config_hash", suggest_plan(first, spec, baseline="vpsde").config_hash(spec))
    study.enqueue_trial(dict(study.trials[0].params), user_attrs={"baseline": "vpsde"})
    twin = claim(study, spec)
    outcome = run_claimed(study, spec, twin, "local")
    assert outcome.state == "DUPLICATE" and outcome.values is None
    assert outcome.row["duplicate_of"] == first.number and "still training" in outcome.row["reason"]
    assert not (tmp_path / "studies" / "twins" / "trials" / str(twin.number) / "checkpoint.pt").exists()
    assert study.trials[twin.number].state.name == "PRUNED"
    counts = count_trials(study)
    assert counts["duplicates"] == 1 and budget_used(counts) == 1  # only the running first trial counts


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


# ---------------------------------------------------------------------- shipped specs, samplers
SHIPPED = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_search_spaces_are_shipped():
    assert {p.name for p in SHIPPED} >= {"aux3.yaml", "mnist_aux3.yaml", "cifar10_aux3.yaml", "imagenet32_aux3.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_loads_and_every_baseline_and_a_first_trial_validate(path):
    """Each shipped spec parses and validates; its baselines and the first trials its sampler
    proposes give valid run configs and processes (no data is loaded)."""
    from mdmsearch.search.plan import baseline_params, suggest_plan
    from mdmsearch.search.spec import load_spec
    from mdmsearch.search.study import directions, make_pruner, make_sampler

    spec = load_spec(path)
    assert spec.study == path.stem and spec.n_trials > 0 and spec.budget.steps >= spec.budget.eval_every
    assert spec.spec_hash() == load_spec(path).spec_hash()
    study = optuna.create_study(sampler=make_sampler(spec), pruner=make_pruner(spec), directions=directions(spec))
    for seed in spec.seeds:
        for name in spec.baselines:
            study.enqueue_trial(baseline_params(spec, seed), user_attrs={"baseline": name})
    n_base = len(spec.seeds) * len(spec.baselines)
    assert n_base >= 1
    for i in range(n_base + 3):
        trial = study.ask()
        plan = suggest_plan(trial, spec, baseline=trial.user_attrs.get("baseline"))
        cfg = plan.run_config(spec)
        assert cfg.train.steps == spec.budget.steps and cfg.data.name == spec.data.name
        check = plan.check(spec)
        if plan.baseline:
            assert check.valid, (plan.baseline, check.reason)
        study.tell(trial, [float(plan.n_aux)] * len(directions(spec)))


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2", "random", "grid"])
def test_every_sampler_proposes_valid_plans(sampler):
    """Past their random start-up, each Optuna sampler of the spec keeps proposing plans from
    the define-by-run space (conditional parameters included); no training."""
    from mdmsearch.search.plan import suggest_plan
    from mdmsearch.search.spec import parse_spec
    from mdmsearch.search.study import directions, make_sampler

    extra = {"objective": {"metric": "val_bpd", "second": "n_params"}} if sampler == "nsga2" else {}
    spec = parse_spec(dict(TINY, baselines=[], sampler={"name": sampler, "seed": 0, "n_startup_trials": 2}, **extra))
    study = optuna.create_study(sampler=make_sampler(spec), directions=directions(spec))
    seen = set()
    for i in range(7):
        trial = study.ask()
        plan = suggest_plan(trial, spec)
        assert plan.n_aux in (0, 1, 2) and plan.hyper["process_lr"] in (0.01, 0.03)
        seen.add(plan.config_hash(spec))
        # a made-up objective that prefers K = 1: the model-based samplers have something to fit
        value = abs(plan.n_aux - 1) + plan.hyper["process_lr"]
        study.tell(trial, [value, float(plan.n_aux)][: len(directions(spec))])
    assert len(study.trials) == 7 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len(seen) >= 2


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_startup_trials_count_the_searched_trials_after_the_baselines(sampler):
    """``sampler.n_startup_trials`` random *searched* trials: the enqueued baseline runs finish
    first and do not use up the start-up (before, 8 of aux3's baseline runs were TPE's whole
    start-up).  Proposals match a sampler built with the baselines added to its start-up."""
    from mdmsearch.search.baselines import baseline_trials
    from mdmsearch.search.plan import suggest_plan
    from mdmsearch.search.spec import parse_spec
    from mdmsearch.search.study import directions, make_sampler

    spec = parse_spec(dict(TINY, sampler={"name": sampler, "seed": 0, "n_startup_trials": 2}))
    base = baseline_trials(spec)
    assert len(base) >= 4
    cls = {"tpe": lambda n: optuna.samplers.TPESampler(seed=0, n_startup_trials=n, multivariate=True, group=True),
           "gp": lambda n: optuna.samplers.GPSampler(seed=0, n_startup_trials=n)}[sampler]

    def proposals(sampler_obj) -> list[dict]:
        study = optuna.create_study(sampler=sampler_obj, directions=directions(spec))
        for name, params in base:
            study.enqueue_trial(params, user_attrs={"baseline": name})
        out = []
        for _ in range(len(base) + 4):
            trial = study.ask()
            plan = suggest_plan(trial, spec, baseline=trial.user_attrs.get("baseline"))
            out.append(dict(trial.params))
            study.tell(trial, abs(plan.n_aux - 1) + plan.hyper["process_lr"])
        return out

    ours = proposals(make_sampler(spec))
    assert ours == proposals(cls(len(base) + 2))


# ---------------------------------------------------------------------- pruning, RDB storage, failures
@pytest.mark.slow
def test_tpe_with_median_pruning_on_sqlite_storage(tmp_path):
    """The default sampler and pruner on an RDB study: pruned trials are PRUNED in the study
    and the board, stopped at an evaluation step, with their learning curve; re-running the
    command resumes the same study (no journal file) and adds nothing."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = dict(TINY, study="tpe", n_trials=6, sampler={"name": "tpe", "seed": 0, "n_startup_trials": 2},
                pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
                budget=dict(TINY["budget"], eval_n_t=2, test_n_t=1, n_samples=0))
    path = _write(tmp_path, spec)
    res = _run(tmp_path, path, "--storage", storage)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["finished"] == 6
    assert not (tmp_path / "studies" / "tpe" / "journal.log").exists()
    df = _board(tmp_path)
    study = _study(tmp_path, "tpe", storage)
    _assert_board_matches_study(df, study)
    _assert_trained_once(tmp_path, df, "tpe")
    pruned = df[df["state"] == "PRUNED"]
    assert len(pruned) >= 1, df[["trial", "baseline", "state", "val_bpd"]]
    assert (pruned["steps"] < 30).all() and (pruned["steps"] % 10 == 0).all()
    assert pruned["reason"].str.contains("pruned at step").all()
    assert _study_states(study).get("PRUNED") == len(pruned)
    curves = pd.read_parquet(tmp_path / "studies" / "leaderboard-curves")
    for _, row in pruned.iterrows():
        curve = curves[curves["trial"] == row["trial"]]
        assert sorted(curve["step"]) == list(range(10, int(row["steps"]) + 1, 10))
        t = study.trials[int(row["trial"])]
        assert max(t.intermediate_values) == row["steps"]
    # resume: same study from the RDB, nothing rerun
    before = sorted(p.name for p in (tmp_path / "studies" / "leaderboard").rglob("*.parquet"))
    again = _run(tmp_path, path, "--storage", storage)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["finished"] == 6
    assert sorted(p.name for p in (tmp_path / "studies" / "leaderboard").rglob("*.parquet")) == before
    assert len(_study(tmp_path, "tpe", storage).trials) == 6
    status = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "status", "tpe", "--storage", storage,
                             "--studies-dir", str(tmp_path / "studies")], capture_output=True, text=True, cwd=tmp_path)
    assert status.returncode == 0 and "PRUNED" in status.stdout, status.stderr


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    """A learning rate that diverges (NaN loss at the first steps, a real failure) is a FAIL row
    with its reason; the other trials still run, and the search stops once its finite space (three
    configurations, fewer than n_trials) is exhausted, and says so."""
    spec = dict(TINY, study="fails", baselines=[], n_trials=4, sampler={"name": "grid", "seed": 3},
                structure={"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
                hyper={"lr": [1e5, 2e-3, 1e-3]}, budget=dict(TINY["budget"], n_samples=0, eval_n_t=2, test_n_t=1))
    res = _run(tmp_path, _write(tmp_path, spec))
    # a study that ends with FAILed trials exits non-zero and says how many and why, in one line
    assert res.returncode == 1, res.stderr[-3000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("mdmsearch: error:")]
    assert len(error) == 1 and "decided trials FAILED" in error[0] and "non-finite" in error[0]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["decided"] == 3 and counts["finished"] == 2 and counts["failed"] == 1
    assert "search space exhausted: all 3 distinct configurations have been tried" in res.stderr
    df = _board(tmp_path).sort_values("trial")
    study = _study(tmp_path, "fails")
    _assert_board_matches_study(df, study)
    failed = df[df["state"] == "FAIL"]
    assert len(failed) >= 1 and (failed["lr"] == 1e5).all()
    assert failed["reason"].str.contains("non-finite").all()
    ok = df[df["lr"] < 1]
    assert list(ok["state"]) == ["COMPLETE", "COMPLETE"] and ok["val_bpd"].notna().all()
    assert int(df["trial"].max()) > int(failed["trial"].min())  # a trial ran after the failure
    assert _study_states(study) == {"FAIL": len(failed), "COMPLETE": 3 - len(failed)}


def test_unexpected_worker_errors_end_the_run_with_one_line(tmp_path):
    """A bug-like exception in a trial (here: the 'meta' device, which cannot compute values, on
    any machine) is not a decided FAIL: each worker tells FAIL and exits with an error, and the
    run ends with exit status 2 and one line; nothing reaches the leaderboard."""
    spec = dict(TINY, study="broken", n_trials=4, workers=2, baselines=["vpsde", "cld"],
                budget=dict(TINY["budget"], device="meta"))
    res = _run(tmp_path, _write(tmp_path, spec))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "2 worker(s) exited with errors" in last and "re-run the same command" in last
    study = _study(tmp_path, "broken")
    assert _study_states(study) == {"FAIL": 2}
    assert not any(t.user_attrs.get("final") for t in study.trials)  # not counted as finished
    assert not (tmp_path / "studies" / "leaderboard").exists()


def test_a_running_trial_keeps_its_heartbeat(tmp_path, monkeypatch):
    """While a trial trains, heartbeat.json names this process and is refreshed (a worker that
    does not beat would look dead to the others after STALE_SECONDS and lose its trial)."""
    from mdmsearch.search import study as study_mod
    from mdmsearch.search.runner import execute_trial
    from mdmsearch.search.spec import parse_spec

    monkeypatch.setattr(study_mod, "HEARTBEAT_SECONDS", 0.05)
    spec = parse_spec(dict(TINY, study="beat", baselines=["vpsde"], n_trials=1, studies_dir=str(tmp_path / "studies"),
                           budget=dict(TINY["budget"], n_samples=0, eval_n_t=1, test_n_t=1)))
    study = study_mod.open_study(spec)
    trial = study.ask()
    beats = []

    def report(step, metrics):
        time.sleep(0.2)  # several heartbeat periods
        hb = json.loads((spec.study_dir / "trials" / str(trial.number) / "heartbeat.json").read_text())
        beats.append(hb)

    outcome = execute_trial(trial, spec, study=study, report=report)
    assert outcome.state == "COMPLETE" and len(beats) == 3
    assert all(b["pid"] == os.getpid() and b["trial"] == trial.number for b in beats)
    times = [b["time"] for b in beats]
    assert times == sorted(times) and len(set(times)) == 3  # refreshed between evaluations
    assert not study_mod.is_stale(study.trials[trial.number])  # alive: never recovered by others


def test_config_hash_drops_what_cannot_change_the_run():
    """Aliases share a dedupe key: gamma without auxiliary variables, 'auto' resolved by K."""
    from mdmsearch.search.plan import TrialPlan
    from mdmsearch.search.spec import SearchSpec

    spec = SearchSpec.model_validate({"study": "h"})

    def plan(n_aux, gamma, par="mixed", stats="floored", baseline=None):
        hyper = {"lr": 2e-3, "process_lr": 1e-2, "gamma": gamma, "beta_1": 10.0, "time_sampler": "vp",
                 "parameterization": par, "residual_stats": stats}
        masks = ([[0] * (n_aux + 1) for _ in range(n_aux + 1)], [[1] * (n_aux + 1) for _ in range(n_aux + 1)])
        return TrialPlan(baseline, 0, n_aux, "full", "full", "full", True, *masks, hyper)

    assert plan(0, 0.01).config_hash(spec) == plan(0, 0.04).config_hash(spec)
    assert plan(1, 0.01).config_hash(spec) != plan(1, 0.04).config_hash(spec)
    assert plan(0, 0.01, "auto").config_hash(spec) == plan(0, 0.01, "eps", None).config_hash(spec)
    assert plan(1, 0.01, "auto").config_hash(spec) == plan(1, 0.01, "mixed").config_hash(spec)
    assert plan(1, 0.01, "eps", None).config_hash(spec) != plan(1, 0.01, "mixed").config_hash(spec)
