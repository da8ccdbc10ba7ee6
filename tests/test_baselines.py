"""Fair baselines (search/baselines.py): a baseline is a fixed structure whose applicable
hyperparameters are searched on a grid, inert ones are aliases, and the confirmation races the
best-tuned baseline."""

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
from mdmsearch.leaderboard import config_label
from mdmsearch.search import space
from mdmsearch.search.baselines import baseline_grid, baseline_trials, range_points
from mdmsearch.search.confirm import Step, next_step, plan_overrides
from mdmsearch.search.plan import baseline_params, suggest_plan
from mdmsearch.search.record import TrialRecord
from mdmsearch.search.spec import FloatRange, SearchSpec
from mdmsearch.search.study import FINAL_ATTR, make_storage, open_study

HYPER = {"lr": 0.002, "process_lr": [0.003, 0.01], "gamma": [0.01, 0.04], "beta_1": 10.0,
         "time_sampler": ["vp", "adaptive"]}


def _spec(tmp_path, **over) -> SearchSpec:
    return SearchSpec.model_validate({
        "study": "fair", "studies_dir": str(tmp_path / "studies"), "baselines": ["vpsde", "cld"], "n_trials": 8,
        "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "hyper": HYPER,
        "confirm": {"seeds": 2, "min_seeds": 2, "top_k": 1, "seed_start": 1000, "test_n_t": 8}, **over})


def _hash(spec, baseline, **params) -> str:
    plan = suggest_plan(optuna.trial.FixedTrial(params), spec, baseline=baseline, seed=0)
    return plan.config_hash(spec, with_seed=False)


def test_a_baselines_applicable_hyperparameters_are_searched(tmp_path):
    spec = _spec(tmp_path)
    vp = baseline_grid(spec, "vpsde")
    # VPSDE (K = 0, fixed Q and D): the time sampler applies, process_lr and gamma do not
    assert vp.searched == ("time_sampler",) and vp.distinct == 2
    assert [c["time_sampler"] for c in vp.configs] == ["vp", "adaptive"]
    assert all(c["process_lr"] == 0.003 and c["gamma"] == 0.01 for c in vp.configs)  # inert: at their defaults
    cld = baseline_grid(spec, "cld")  # CLD (K = 1): gamma, the auxiliary's initial variance, applies
    assert cld.searched == ("gamma", "time_sampler") and len(cld.configs) == 4
    assert {(c["gamma"], c["time_sampler"]) for c in cld.configs} == {(g, t) for g in (0.01, 0.04)
                                                                       for t in ("vp", "adaptive")}
    # the first configuration is the one a baseline ran before (every value at its default)
    assert cld.configs[0] == {k: v for k, v in baseline_params(spec, 0).items() if k != "seed"}
    # each is a configuration of its own: a run config that differs where it should
    configs = [suggest_plan(optuna.trial.FixedTrial(c), spec, baseline="cld", seed=0).run_config(spec)
               for c in cld.configs]
    assert {(c.process.gamma, c.train.time_sampler) for c in configs} == {(g, t) for g in (0.01, 0.04)
                                                                          for t in ("vp", "adaptive")}


def test_inert_dimensions_are_aliases_of_one_configuration(tmp_path):
    spec = _spec(tmp_path)
    base = dict(lr=0.002, process_lr=0.003, gamma=0.01, time_sampler="vp")
    # a fixed process learns no entry of Q or D: process_lr is an alias (one hash, one training)
    assert _hash(spec, "cld", **base) == _hash(spec, "cld", **{**base, "process_lr": 0.01})
    assert _hash(spec, "vpsde", **base) == _hash(spec, "vpsde", **{**base, "gamma": 0.04})  # no auxiliaries
    assert _hash(spec, "cld", **base) != _hash(spec, "cld", **{**base, "gamma": 0.04})  # CLD has one
    assert _hash(spec, "vpsde", **base) != _hash(spec, "vpsde", **{**base, "time_sampler": "adaptive"})
    # a learned structure frozen at its start (learn: false) learns nothing either; a learned one does
    frozen = _spec(tmp_path, structure={"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"],
                                        "learn": [False]})
    learned = dict(n_aux=1, q_pattern="full", d_pattern="full", **base)
    assert _hash(frozen, None, **learned) == _hash(frozen, None, **{**learned, "process_lr": 0.01})
    assert _hash(spec, None, **learned) != _hash(spec, None, **{**learned, "process_lr": 0.01})


def test_the_study_enqueues_each_baselines_grid_on_every_seed(tmp_path):
    spec = _spec(tmp_path, seeds=[0, 1])
    study = open_study(spec)
    waiting = sum(t.state.name == "WAITING" for t in study.trials)
    assert waiting == (2 + 4) * 2  # (VPSDE 2 + CLD 4 configurations) x 2 seeds
    asked = [study.ask() for _ in range(waiting)]  # (as a worker claims them: in the order enqueued)
    plans = [suggest_plan(t, spec, baseline=t.user_attrs["baseline"]) for t in asked]
    enqueued = [(p.baseline, p.seed, p.hyper["time_sampler"], p.hyper["gamma"]) for p in plans]
    assert len(set(enqueued)) == len(enqueued)  # no alias enqueued twice
    assert {(b, ts) for b, _, ts, _ in enqueued} == {(b, ts) for b in ("vpsde", "cld") for ts in ("vp", "adaptive")}
    # seed by seed, the defaults of every baseline first (the pruner's yardstick early)
    assert enqueued[:2] == [("vpsde", 0, "vp", 0.01), ("cld", 0, "vp", 0.01)]
    assert [s for _, s, _, _ in enqueued] == [0] * 6 + [1] * 6
    assert baseline_trials(spec) == [(p.baseline, p.params) for p in plans]


def test_a_spec_that_fixes_every_hyperparameter_enqueues_what_it_did_before(tmp_path):
    fixed = {"lr": 0.002, "process_lr": 0.01, "gamma": 0.04, "beta_1": 10.0, "time_sampler": ["vp"]}
    spec = _spec(tmp_path, hyper=fixed, seeds=[3, 4], baselines=["vpsde", "cld", "alda", "malda"])
    before = [(name, baseline_params(spec, seed)) for seed in spec.seeds for name in spec.baselines]
    assert baseline_trials(spec) == before  # one configuration per baseline, the same parameters, the same order
    searched_seed_only = _spec(tmp_path, hyper={"process_lr": [0.01, 0.03]})  # inert for every baseline
    assert [len(baseline_grid(searched_seed_only, b).configs) for b in ("vpsde", "cld")] == [1, 1]


def test_baseline_configs_keeps_the_default_and_a_seeded_draw(tmp_path):
    spec = _spec(tmp_path, baseline_configs=3, hyper={**HYPER, "beta_1": [8.0, 10.0, 12.0]})
    grid = baseline_grid(spec, "cld")
    assert grid.distinct == 2 * 2 * 3 and len(grid.configs) == 3
    assert grid.configs[0] == {k: v for k, v in baseline_params(spec, 0).items() if k != "seed"}
    assert baseline_grid(spec, "cld") == grid  # the same draw every time (every worker, every resume)
    again = baseline_grid(_spec(tmp_path, baseline_configs=3, sampler={"name": "random", "seed": 1},
                                hyper={**HYPER, "beta_1": [8.0, 10.0, 12.0]}), "cld")
    assert again.configs[0] == grid.configs[0] and len(again.configs) == 3
    # a budget like n_trials, read once when the study is created: not in the spec hash
    assert _spec(tmp_path, baseline_configs=5).spec_hash() == _spec(tmp_path).spec_hash()


def test_a_continuous_range_is_three_bin_centres_midpoint_first():
    pts = range_points(FloatRange(low=1e-4, high=1e-2, log=True))
    assert pts == pytest.approx([1e-3, 1e-4 * 100 ** (1 / 6), 1e-4 * 100 ** (5 / 6)])
    assert range_points(FloatRange(low=0.0, high=6.0)) == pytest.approx([3.0, 1.0, 5.0])
    spec = SearchSpec.model_validate({"study": "c", "baselines": ["vpsde"], "hyper": {"lr": {"low": 1e-4, "high": 1e-2,
                                                                                             "log": True}}})
    lrs = [c["lr"] for c in baseline_grid(spec, "vpsde").configs]
    assert lrs == pytest.approx(pts) and lrs[0] == baseline_params(spec, 0)["lr"]  # the default, exactly


def test_the_dry_run_shows_the_baselines_grids_and_what_they_leave_of_n_trials(tmp_path):
    spec = _spec(tmp_path)
    summary = space.enumerate_space(spec, check=False)
    assert summary.baselines == 6
    text = space.describe(spec, summary, None)
    assert "baselines: 6 run(s)" in text
    assert "VPSDE 2 (time_sampler; inert: process_lr, gamma)" in text
    assert "CLD 4 (gamma, time_sampler; inert: process_lr)" in text
    assert "2 of 8 left for the searched structures" in text
    small = _spec(tmp_path, n_trials=5, baseline_configs=3)
    text = space.describe(small, space.enumerate_space(small, check=False), None)
    assert "CLD 3 of 4 (gamma, time_sampler" in text and "n_trials 5 <= 5 baseline runs" in text


def test_a_baselines_label_leaves_out_what_is_inert_for_it():
    params = {"process_lr": 0.01, "gamma": 0.04, "time_sampler": "adaptive"}
    assert config_label({"baseline": "vpsde", "n_aux": 0, "params": params}) == "VPSDE (time_sampler=adaptive)"
    assert config_label({"baseline": "cld", "n_aux": np.int64(1), "params": params}) == \
        "CLD (gamma=0.04 time_sampler=adaptive)"
    learned = {"baseline": None, "n_aux": 1, "q_pattern": "full", "d_pattern": "full", "d_param": "full",
               "params": params}
    assert config_label({**learned, "learn": True}).endswith("(gamma=0.04 process_lr=0.01 time_sampler=adaptive)")
    assert config_label({**learned, "learn": np.False_}).endswith("fixed (gamma=0.04 time_sampler=adaptive)")


# ---------------------------------------------------------------------- the confirmation races the best-tuned one
N = 60
COMMON = np.random.default_rng(0).normal(2.0, 0.3, 2 * N)  # per-example difficulty shared by all runs


def _quality(plan) -> float:
    """VPSDE is best with adaptive t (every other baseline configuration is worse by 0.05 or
    more); the learned structure lies between."""
    if plan.baseline == "vpsde":
        return -0.05 if plan.hyper["time_sampler"] == "adaptive" else 0.0
    return 0.2 if plan.baseline else -0.02


def _complete(study, spec, trial, rng) -> None:
    """Train nothing: write what a trained trial leaves (per-example BPDs, attributes) and tell it."""
    plan = suggest_plan(trial, spec, baseline=trial.user_attrs.get("baseline"),
                        **plan_overrides(spec, TrialRecord.of(trial)))
    bpd = COMMON + rng.normal(0, 0.002) + rng.normal(0, 0.01, 2 * N) + _quality(plan)
    art = spec.study_dir / "trials" / str(trial.number)
    art.mkdir(parents=True)
    pd.DataFrame({"split": ["val"] * N + ["test"] * N, "index": list(range(N)) * 2, "bpd": bpd}).to_parquet(
        art / PER_EXAMPLE_FILE)
    attrs = {"artifact_dir": str(art), "config_group": plan.config_hash(spec, with_seed=False), "outcome": "COMPLETE",
             FINAL_ATTR: True}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, float(bpd[:N].mean()))


def test_the_confirmation_races_the_best_tuned_baseline(tmp_path):
    spec = _spec(tmp_path)
    study = open_study(spec)
    rng = np.random.default_rng(3)
    for _ in range(spec.n_trials):  # the baselines' grids first, then the sampler's draws
        _complete(study, spec, study.ask(), rng)
    assert next_step(study, spec) is Step.CLAIM
    plan = study.user_attrs["confirm_plan"]
    base = next(c for c in plan["candidates"] if c["role"] == "baseline")
    assert base["label"] == "VPSDE (time_sampler=adaptive)" and base["params"]["time_sampler"] == "adaptive"
    # the baseline's fresh-seed trials train the tuned configuration
    trained = []
    while next_step(study, spec) is Step.CLAIM:
        while any(t.state.name == "WAITING" for t in study.trials):
            t = study.ask()
            if t.user_attrs.get("baseline"):
                plan_t = suggest_plan(t, spec, baseline=t.user_attrs["baseline"],
                                      **plan_overrides(spec, TrialRecord.of(t)))
                trained.append(plan_t.run_config(spec))
            _complete(study, spec, t, rng)
    assert [(c.process.name, c.train.time_sampler, c.train.seed) for c in trained] == [
        ("vpsde", "adaptive", 1000), ("vpsde", "adaptive", 1001)]
    assert study.user_attrs["confirmation"]["baseline"]["label"] == "VPSDE (time_sampler=adaptive)"


@pytest.mark.slow
def test_a_tiny_search_trains_each_baseline_configuration_once_and_races_the_best(tmp_path):
    """End to end: VPSDE's two time samplers are trained (process_lr, inert for it, is not),
    labelled without process_lr, and the confirmation races the one with the lower validation BPD."""
    spec = {"study": "fb", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
            "budget": {"steps": 20, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
                       "test_n_t": 2, "quality": None},
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
            "hyper": {"process_lr": [0.01, 0.03], "time_sampler": ["vp", "adaptive"]},
            "baselines": ["vpsde"], "n_trials": 3, "workers": 1,
            "confirm": {"seeds": 2, "top_k": 1, "test_n_t": 2}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "mdmsearch.cli", "run", str(path), "--studies-dir", str(tmp_path / "studies")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard")
    base = df[df["baseline"].notna() & (df["seed"] == 0)]
    assert sorted(base["time_sampler"]) == ["adaptive", "vp"] and base["config_group"].nunique() == 2
    assert (base["state"] == "COMPLETE").all() and base["duplicate_of"].isna().all()
    assert set(base["process_lr"]) == {0.01}  # the inert value at its default: never trained twice
    best = base.sort_values("val_bpd").iloc[0]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["finished"] >= 3
    study = optuna.load_study(study_name="fb", storage=make_storage(f"journal:{tmp_path / 'studies/fb/journal.log'}"))
    raced = study.user_attrs["confirmation"]["baseline"]
    assert raced["group"] == best["config_group"]
    assert raced["label"] == f"VPSDE (time_sampler={best['time_sampler']})"


def test_a_study_from_before_the_hash_change_keeps_its_groups(tmp_path):
    """process_lr became inert for baselines, which changed their configuration hash: a study
    created before keeps the groups its trials recorded, in the rows of its confirmation trials
    (the group they were enqueued for) and in rebuilt rows (the group the trial recorded)."""
    from mdmsearch.search import runner
    from mdmsearch.search.rebuild import row_from_trial
    from mdmsearch.search.record import Confirmation, enqueue, write

    spec = _spec(tmp_path, baselines=[])
    study = open_study(spec)
    params = {"process_lr": 0.01, "gamma": 0.01, "time_sampler": "vp"}
    enqueue(study, params, baseline="vpsde", confirm=Confirmation("old-group", "baseline", 1000, 1))
    run = runner.begin(study.ask(), spec, "local")
    assert run.row["config_group"] == "old-group" == TrialRecord.of(run.trial).config_group
    enqueue(study, params, baseline="vpsde")
    searched = runner.begin(study.ask(), spec, "local").trial  # (its plan read back, as a worker does)
    write(searched, config_hash="old-hash", config_group="old-search-group")  # what an older hash recorded
    study.tell(searched, 3.0)
    rec = TrialRecord.of(study.trials[searched.number])
    row = row_from_trial(spec, rec, "local")
    assert (row["config_hash"], row["config_group"]) == ("old-hash", "old-search-group")
