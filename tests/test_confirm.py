"""Intensification: after the search, the incumbent, the best baseline and the challengers are
trained on fresh seeds as ordinary trials of the study, round by round, until the structure
verdict is decided; decisions read the validation split only."""

import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.compare import PER_EXAMPLE_FILE
from mdmsearch.search import confirm
from mdmsearch.search.confirm import Step, next_step, plan_overrides
from mdmsearch.search.record import TrialRecord

CONFIRM_ATTR, PLAN_ATTR, RESULT_ATTR = "confirm", "confirm_plan", "confirmation"  # (the stored keys)
from mdmsearch.search.plan import baseline_params, suggest_plan
from mdmsearch.search.spec import SearchSpec
from mdmsearch.search.study import FINAL_ATTR, budget_used, count_trials, make_storage, stop_reason

N = 60  # examples per split
COMMON = np.random.default_rng(0).normal(2.0, 0.3, 2 * N)  # per-example difficulty shared by all runs


def _spec(tmp_path, **confirm_over) -> SearchSpec:
    return SearchSpec.model_validate({
        "study": "conf", "studies_dir": str(tmp_path / "studies"), "baselines": ["vpsde", "cld"], "n_trials": 5,
        "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full"]},
        "sampler": {"name": "random", "seed": 0},
        "hyper": {"lr": 0.002, "process_lr": 0.01, "gamma": 0.04, "beta_1": 10.0, "time_sampler": ["vp"]},
        "confirm": {"seeds": 3, "min_seeds": 2, "top_k": 2, "seed_start": 1000, "test_n_t": 64, **confirm_over}})


def _study(spec) -> optuna.Study:
    study = optuna.create_study(study_name=spec.study, storage=make_storage(f"journal:{spec.study_dir / 'j.log'}"))
    for name in spec.baselines:
        study.enqueue_trial(baseline_params(spec, 0), user_attrs={"baseline": name})
    return study


def _complete(study, spec, trial, quality: dict, rng) -> str:
    """Train nothing: write what a trained trial leaves (per-example BPDs, attributes) and tell
    it.  ``quality(plan) -> (val shift, test shift)`` of the configuration; a seed adds a shift."""
    plan = suggest_plan(trial, spec, baseline=trial.user_attrs.get("baseline"), **plan_overrides(spec, TrialRecord.of(trial)))
    group = plan.config_hash(spec, with_seed=False)
    val_shift, test_shift = quality(plan)
    seed_effect = rng.normal(0, 0.002)
    bpd = COMMON + seed_effect + rng.normal(0, 0.01, 2 * N) + np.r_[np.full(N, val_shift), np.full(N, test_shift)]
    art = spec.study_dir / "trials" / str(trial.number)
    art.mkdir(parents=True)
    pd.DataFrame({"split": ["val"] * N + ["test"] * N, "index": list(range(N)) * 2, "bpd": bpd}).to_parquet(
        art / PER_EXAMPLE_FILE)
    for key, value in {"artifact_dir": str(art), "config_group": group, "outcome": "COMPLETE", FINAL_ATTR: True}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, float(bpd[:N].mean()))
    return group


def _search(study, spec, quality, rng) -> None:
    """The search's trials: the baselines, K=2 full, K=1 full, then what the sampler draws."""
    study.enqueue_trial({"n_aux": 2, "q_pattern": "full"})
    study.enqueue_trial({"n_aux": 1, "q_pattern": "full"})
    for _ in range(spec.n_trials):
        _complete(study, spec, study.ask(), quality, rng)


def _confirm_all(study, spec, quality, rng) -> list:
    """Run confirmation rounds as a worker would; returns the steps taken."""
    steps = []
    while (step := next_step(study, spec)) is not Step.DONE:
        assert step is Step.CLAIM
        while any(t.state.name == "WAITING" for t in study.trials):
            _complete(study, spec, study.ask(), quality, rng)
        steps.append(step)
    return steps


def _learned_better_on_val_worse_on_test(plan):
    """Learned K=2 with a full Q beats everything on validation by far (and is worse on test:
    the test split must not steer anything); VPSDE is the best baseline."""
    if plan.baseline:
        return (0.0, 0.0) if plan.baseline == "vpsde" else (0.2, 0.2)
    return (-0.1, 0.1) if (plan.n_aux, plan.q_pattern) == (2, "full") else (0.05, -0.05)


def test_the_confirmation_races_fresh_seeds_and_reports_a_selection_free_margin(tmp_path):
    spec = _spec(tmp_path, seeds=4)
    study = _study(spec)
    rng = np.random.default_rng(1)
    _search(study, spec, _learned_better_on_val_worse_on_test, rng)
    counts = count_trials(study)
    assert stop_reason(study, spec, counts, None) is not None  # the search has its trials
    _confirm_all(study, spec, _learned_better_on_val_worse_on_test, rng)
    plan = study.user_attrs[PLAN_ATTR]
    roles = {c["role"]: c for c in plan["candidates"]}
    assert roles["incumbent"]["label"].startswith("learned K=2") and roles["baseline"]["label"] == "VPSDE"
    assert [c["role"] for c in plan["candidates"]].count("challenger") <= 1
    confirmations = [t for t in study.trials if t.user_attrs.get(CONFIRM_ATTR)]
    seeds = {t.user_attrs[CONFIRM_ATTR]["seed"] for t in confirmations}
    # the incumbent is far better than VPSDE on validation: decided at the interim look of round 3
    # (p < 0.001; round 2's look, at df = 1, needs t > 636), before the last look (round 4)
    assert seeds == {1000, 1001, 1002}
    for t in confirmations:  # ordinary trials of the study: the plan trained the fresh seed, finer evaluation
        assert "seed" not in t.params
        assert t.user_attrs["config_group"] == t.user_attrs[CONFIRM_ATTR]["group"]  # one configuration
        plan_t = suggest_plan(t, spec, baseline=t.user_attrs.get("baseline"), **plan_overrides(spec, TrialRecord.of(t)))
        assert plan_t.run_config(spec).train.test_n_t == 64 and plan_t.run_config(spec).train.seed in seeds
    # not counted toward n_trials, and the search would not start new trials
    counts = count_trials(study)
    assert counts["confirmation"] == len(confirmations) and budget_used(counts) == spec.n_trials
    res = study.user_attrs[RESULT_ATTR]
    assert res["done"] and res["fresh_seeds"] == [1000, 1001, 1002] and res["winner"]["role"] == "incumbent"
    assert res["vs_baseline_val"]["verdict"] == "better" and res["vs_baseline_val"]["n_seeds_a"] == 3
    # the reported (test) verdict is tested at the last look's level, 0.04 - 2 interim looks x 0.001
    assert res["decided_at_round"] == 3 and res["level"] == pytest.approx(0.038) and res["horizons"] == [4]
    assert res["vs_baseline_val"]["alpha"] == pytest.approx(0.001)  # the look's level, not 5%
    # the reported margin is the fresh seeds' test split (here the opposite of validation)
    assert res["vs_baseline"]["diff"] > 0.05 and res["vs_baseline"]["verdict"] == "worse"
    assert "fresh seeds [1000, 1001, 1002]" in confirm.describe(res)
    assert next_step(study, spec) is Step.DONE  # resuming: nothing more


def test_decisions_never_read_the_test_split(tmp_path, monkeypatch):
    """The incumbent, the rounds and the stop are decided on validation values only."""
    from mdmsearch import compare

    spec = _spec(tmp_path)
    study = _study(spec)
    rng = np.random.default_rng(2)
    _search(study, spec, _learned_better_on_val_worse_on_test, rng)
    reads = []
    real = compare.read_per_example
    spy = lambda run, split="heldout": reads.append(split) or real(run, split)  # noqa: E731
    monkeypatch.setattr(compare, "read_per_example", spy)
    monkeypatch.setattr(confirm, "read_per_example", spy)
    monkeypatch.setattr(confirm, "result", lambda plan, study, spec: {"winner": None})  # (reporting may read test)
    _confirm_all(study, spec, _learned_better_on_val_worse_on_test, rng)
    assert reads and set(reads) == {"val"}


def test_a_tie_runs_to_the_seed_limit_and_a_worse_challenger_drops_out(tmp_path):
    """Incumbent and baseline equal: not decided, so all `seeds` rounds run; a challenger far
    worse than the incumbent on validation is dropped at the first look that can decide it
    (round 3: at round 2, df = 1, an interim look needs t > 636) and is never trained again."""
    def quality(plan):
        if plan.baseline:
            return (0.0, 0.0) if plan.baseline == "vpsde" else (0.3, 0.3)
        return (0.0, 0.0) if plan.n_aux == 1 and plan.q_pattern == "full" else (0.2, 0.2)

    spec = _spec(tmp_path, seeds=4, top_k=3)
    study = _study(spec)
    rng = np.random.default_rng(3)
    _search(study, spec, quality, rng)
    _confirm_all(study, spec, quality, rng)
    plan = study.user_attrs[PLAN_ATTR]
    rounds = {}
    for t in study.trials:
        info = t.user_attrs.get(CONFIRM_ATTR)
        if info:
            rounds.setdefault(info["role"] + ":" + info["group"], []).append(info["round"])
    inc = next(c for c in plan["candidates"] if c["role"] == "incumbent")
    assert sorted(rounds["incumbent:" + inc["group"]]) == [1, 2, 3, 4]  # a tie: every round
    for c in plan["candidates"]:
        if c["role"] == "challenger":
            assert sorted(rounds["challenger:" + c["group"]]) == [1, 2, 3]  # decided worse: dropped
    res = study.user_attrs[RESULT_ATTR]
    assert res["vs_baseline_val"]["verdict"] == "tie within noise" and res["fresh_seeds"] == [1000, 1001, 1002, 1003]


def test_a_reopened_race_keeps_the_schedule_it_started_with(tmp_path):
    """The race's first look (``min_seeds``) is frozen in its plan: `mdmsearch confirm --seeds 5`
    on a race that started with min_seeds 3 judges rounds 1-3 as they were judged (one look, at
    round 3, at the segment's whole 0.04), then spends the reopening's budget on rounds 4-5
    (before: reopening looked from round 2, which moved the first segment's last level to 0.039
    and added a look that never happened)."""
    def quality(plan):
        if plan.baseline:
            return (0.0, 0.0) if plan.baseline == "vpsde" else (0.3, 0.3)
        return (0.0, 0.0)

    spec = _spec(tmp_path, seeds=3, min_seeds=3, top_k=1)
    study = _study(spec)
    rng = np.random.default_rng(5)
    _search(study, spec, quality, rng)
    _confirm_all(study, spec, quality, rng)
    assert study.user_attrs[PLAN_ATTR]["min_seeds"] == 3
    first, _ = confirm.race(study.user_attrs[PLAN_ATTR], study, spec)
    assert [(look["round"], look["level"]) for look in first.looks] == [(3, pytest.approx(0.04))]
    again = confirm.prepare(spec, study, top_k=1, seeds=5)
    assert again.confirm.min_seeds == 3 and study.user_attrs[PLAN_ATTR]["horizons"] == [3, 5]
    _confirm_all(study, again, quality, rng)
    after, rounds = confirm.race(study.user_attrs[PLAN_ATTR], study, again)
    assert rounds == 5 and after.looks[0] == first.looks[0]
    assert [look["round"] for look in after.looks] == [3, 4, 5]
    assert [look["level"] for look in after.looks[1:]] == [pytest.approx(0.001), pytest.approx(0.002)]


def test_baselines_and_confirmation_trials_are_never_pruned():
    from mdmsearch.search.record import Confirmation
    from mdmsearch.search.runner import prunable

    base = TrialRecord(0, 0, None, {}, None, {}, None, None)
    assert prunable(base)
    assert not prunable(base.__class__(**{**base.__dict__, "baseline": "vpsde"}))
    assert not prunable(base.__class__(**{**base.__dict__, "confirm": Confirmation("g", "incumbent", 1000, 1)}))


def test_without_a_completed_baseline_nothing_is_confirmed(tmp_path):
    spec = _spec(tmp_path).model_copy(update={"baselines": []})
    study = optuna.create_study(study_name="c", storage=make_storage(f"journal:{tmp_path / 'j.log'}"))
    _search(study, spec, _learned_better_on_val_worse_on_test, np.random.default_rng(4))
    assert next_step(study, spec) is Step.DONE
    assert "no completed" in study.user_attrs[RESULT_ATTR]["reason"]


def test_a_spec_without_confirmation_confirms_nothing(tmp_path):
    spec = _spec(tmp_path, seeds=0, min_seeds=2)
    study = _study(spec)
    assert next_step(study, spec) is Step.DONE and RESULT_ATTR not in study.user_attrs
    with pytest.raises(ValueError, match="min_seeds"):
        _spec(tmp_path, seeds=2, min_seeds=3)


@pytest.mark.slow
def test_a_tiny_search_confirms_its_winner(tmp_path):
    """End to end with two workers: the confirmation trials are trained (fresh seeds, rows in
    the leaderboard), not counted toward n_trials, and a re-run has nothing left to do."""
    spec = {"study": "tc", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
            "budget": {"steps": 20, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
                       "test_n_t": 2},
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},  # eager: confirmations exempt
            "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full"]},
            "baselines": ["vpsde"], "n_trials": 3, "workers": 2,
            "confirm": {"seeds": 2, "top_k": 2, "test_n_t": 4}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mdmsearch.cli", "run", str(path), "--studies-dir", str(tmp_path / "studies")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["finished"] - counts["duplicates"] - counts["confirmation"] == 3
    study = optuna.load_study(study_name="tc", storage=make_storage(f"journal:{tmp_path / 'studies/tc/journal.log'}"))
    res_attr = study.user_attrs[RESULT_ATTR]
    assert res_attr["fresh_seeds"] == [1000, 1001] and res_attr["vs_baseline"]["n_seeds_a"] == 2
    assert "confirmation ended after" in res.stderr and "winner (confirmed): " in res.stderr
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard")
    fresh = df[df["seed"] >= 1000]
    assert len(fresh) == counts["confirmation"] and (fresh["state"] == "COMPLETE").all()  # never pruned
    assert set(fresh["config_group"]) <= set(df[df["seed"] == 0]["config_group"])  # the same configurations
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert again.returncode == 0 and len(pd.read_parquet(tmp_path / "studies" / "leaderboard")) == len(df)


@pytest.mark.slow
def test_confirm_after_the_fact_and_at_a_larger_budget(tmp_path):
    """`mdmsearch confirm` on a study searched without confirmation: its winner, best baseline
    and runner-up on fresh seeds in the same study; with --steps, a confirmation-only study of
    the same candidates at another budget, and whether the ranking holds."""
    spec = {"study": "af", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
            "budget": {"steps": 10, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
                       "test_n_t": 2},
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full"]},
            "hyper": {"process_lr": 0.01, "gamma": 0.04, "time_sampler": ["vp"]},
            "baselines": ["vpsde"], "n_trials": 3, "workers": 1}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    studies = str(tmp_path / "studies")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mdmsearch.cli", *args, "--studies-dir", studies],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    assert cli("run", str(path)).returncode == 0
    res = cli("confirm", "af", "--seeds", "2", "--top", "2", "--format", "json")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["study"] == "af" and info["result"]["fresh_seeds"] == [1000, 1001]
    roles = [r["role"] for r in info["ranking"]["candidates"]]
    assert roles[:2] == ["incumbent", "baseline"] and all(r["fresh_seeds"] == 2 for r in info["ranking"]["candidates"]
                                                         if r["role"] != "challenger")
    study = optuna.load_study(study_name="af", storage=make_storage(f"journal:{tmp_path / 'studies/af/journal.log'}"))
    assert count_trials(study)["confirmation"] >= 4 and budget_used(count_trials(study)) == 3  # the search: unchanged
    res = cli("confirm", "af", "--seeds", "2", "--steps", "20")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("study af.steps20 (20 steps): ") and "Kendall tau" in res.stdout
    assert "the search's winner is still the best searched configuration: " in res.stdout
    derived = optuna.load_study(study_name="af.steps20",
                                storage=make_storage(f"journal:{tmp_path / 'studies/af.steps20/journal.log'}"))
    assert all(t.user_attrs.get(CONFIRM_ATTR) for t in derived.trials)  # no search there: fresh seeds only
    assert {t.user_attrs[CONFIRM_ATTR]["seed"] for t in derived.trials} == {1000, 1001}
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard" / "dataset=digits" / "study=af.steps20")
    assert (df["steps"] == 20).all() and len(df) == len(derived.trials)
    bad = cli("confirm", "nope", "--seeds", "2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
