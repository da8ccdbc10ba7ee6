"""The search space enumerated (dry run, exhaustion), duplicates that do not spend the budget,
and baselines that no executor prunes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.search.runner import _optuna_reporter
from mdmsearch.training import StopTraining
from mdmsearch.search.space import enumerate_space
from mdmsearch.search.spec import SearchSpec, load_spec
from mdmsearch.search.study import MAX_REPEATS, budget_used, stop_reason

ROOT = Path(__file__).resolve().parents[1]
TINY = {"study": "space", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
        "budget": {"steps": 20, "eval_every": 10, "eval_examples": 16, "batch_size": 16, "n_samples": 0,
                   "eval_n_t": 2, "test_n_t": 1},
        "pruner": {"name": "none"}, "baselines": [], "workers": 1}


def _spec(**over) -> SearchSpec:
    return SearchSpec.model_validate({**TINY, **over})


def _run(tmp_path, spec: dict, *extra):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "mdmsearch.cli", "run", str(path), "--studies-dir",
                           str(tmp_path / "studies"), *extra], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_aux3_space_enumerated_with_aliases_and_invalid_structures():
    summary = enumerate_space(load_spec(ROOT / "search_spaces" / "aux3.yaml", {}))
    # K=0: one structure; K=1..3: 2 Q x 4 D patterns each, of which K=1 has only 3 distinct masks
    assert summary.raw_structures == 25 and len(summary.structures) == 20
    k1 = [s for s in summary.structures if s.plan.n_aux == 1]
    assert len(k1) == 3 and sorted(len(s.names) for s in k1) == [2, 2, 4]
    invalid = [s for s in summary.structures if not s.valid]
    assert sorted(s.label for s in invalid) == ["K=3 Q:chain D:last", "K=3 Q:full D:last"]
    assert all("not positive definite" in s.reason for s in invalid)
    # configurations: K=0 ignores gamma (3 process_lr x 2 time samplers), K>=1 3 x 2 x 2 each
    assert summary.finite and summary.configs == 6 + 17 * 12
    assert summary.hyper["gamma"].startswith("2 choices") and summary.hyper["lr"] == "fixed 0.002"


def test_dry_run_estimates_the_confirmation_by_rounds():
    """A round trains its candidates side by side and waits for all of them: ceil((top_k + 1) /
    workers) confirmation trials per round, ``confirm.seeds`` rounds."""
    from mdmsearch.search.space import TimeEstimate, describe

    est = TimeEstimate(step_s=0.01, eval_s=0.001, trial_s=10.0, label="K=1", confirm_trial_s=30.0)
    for top_k, workers, minutes in ((1, 2, 8), (2, 2, 16), (1, 1, 16), (2, 3, 8)):
        spec = _spec(structure={"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]}, workers=workers,
                     baselines=["vpsde"], confirm={"seeds": 16, "min_seeds": 10, "top_k": top_k, "test_n_t": 128})
        text = describe(spec, enumerate_space(spec), est)
        assert f"  about {minutes} min if it runs all 16 rounds (30 s per trial, {top_k + 1} per round on " \
               f"{workers} worker(s))" in text, text
    # without a confirmation: no such line
    assert "rounds" not in describe(_spec(), enumerate_space(_spec()), est)


def test_a_one_element_list_is_a_fixed_value_not_a_parameter():
    """`process_lr: [0.5]` is fixed, as `time_sampler: [vp]` is: no trial asks for it, and the
    baselines' grid builds (before: FixedTrial raised 'process_lr is not found', a traceback
    from `run`, `--dry-run` and the sampler)."""
    import optuna

    from mdmsearch.search.baselines import baseline_trials
    from mdmsearch.search.plan import suggest_plan

    spec = _spec(hyper={"process_lr": [0.5], "gamma": [0.01, 0.04]}, baselines=["vpsde", "cld"])
    assert [name for name, _ in baseline_trials(spec)] == ["vpsde", "cld", "cld"]  # CLD over gamma only
    plan = suggest_plan(optuna.trial.FixedTrial({"n_aux": 1, "q_pattern": "full", "d_pattern": "full",
                                                 "gamma": 0.04}), spec)
    assert plan.hyper["process_lr"] == 0.5 and "process_lr" not in plan.params


def test_continuous_hyperparameters_make_the_space_unbounded():
    summary = enumerate_space(_spec(structure={"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]},
                                    hyper={"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    assert not summary.finite and summary.continuous == ["lr"]
    assert summary.hyper["lr"] == "continuous [0.0001, 0.01] log"


def test_dry_run_prints_the_space_and_creates_nothing(tmp_path):
    spec = dict(TINY, structure={"n_aux": [0, 1], "q_patterns": ["full", "chain"], "d_patterns": ["full", "aux"]},
                hyper={"gamma": [0.01, 0.04]}, n_trials=50)
    res = _run(tmp_path, spec, "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "structures: 5 combinations -> 3 distinct after aliasing (2 aliases), 3 valid, 0 invalid" in out
    assert "K=1 Q:full D:aux" in out and "(= Q:chain D:aux)" in out
    assert "gamma 2 choices [0.01, 0.04]" in out and "gamma is ignored at K = 0" in out
    # K=0 once (gamma aliased away), K=1 two structures x two gammas
    assert "configurations: 5 distinct searched configurations" in out
    assert "n_trials 50 exceeds the space: the search stops once all 5 are tried" in out
    assert "estimated time:" in out and "ms/step" in out
    assert not (tmp_path / "studies").exists()


def test_aliased_configurations_train_once_and_duplicates_do_not_count(tmp_path):
    """K = 0 with two gammas is one configuration: a second gamma is answered from the first
    trial's result without training and without counting toward n_trials."""
    spec = dict(TINY, study="alias", structure={"n_aux": [0]}, hyper={"gamma": [0.01, 0.04], "process_lr": [0.01, 0.03]},
                sampler={"name": "grid", "seed": 2}, n_trials=2)  # grid order: (0.04, 0.01), (0.01, 0.01), (0.04, 0.03)
    res = _run(tmp_path, spec)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["decided"] == 3 and counts["duplicates"] == 1 and counts["finished"] == 3
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard").sort_values("trial")
    assert list(df["state"]) == ["COMPLETE", "DUPLICATE", "COMPLETE"]
    assert df["config_hash"].iloc[0] == df["config_hash"].iloc[1] != df["config_hash"].iloc[2]
    assert list(df["gamma"])[:2] == [0.04, 0.01] and int(df["duplicate_of"].iloc[1]) == 0
    assert len(list((tmp_path / "studies" / "alias" / "trials").glob("*/checkpoint.pt"))) == 2  # trained twice

    # promote: trial 1 was answered by trial 0, so its configuration is trial 0's; flags override it
    train = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "-q", "train", "--from-trial", "alias/1",
                            "--studies-dir", str(tmp_path / "studies"), "--steps", "30", "--out", str(tmp_path / "best")],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads(train.stdout.strip().splitlines()[-1])["steps"] == 30
    promoted = yaml.safe_load((tmp_path / "best" / "config.yaml").read_text())
    trial0 = yaml.safe_load((Path(df["artifact_dir"].iloc[0]) / "config.yaml").read_text())
    assert promoted["train"]["steps"] == 30 and trial0["train"]["steps"] == 20
    for section in ("process", "model", "data"):
        assert promoted[section] == trial0[section], section
    assert promoted["optim"] == trial0["optim"] and promoted["train"]["seed"] == trial0["train"]["seed"]
    # STUDY/best picks the lowest val_bpd among trained trials
    from mdmsearch.search.promote import trial_run_config

    _, where = trial_run_config("alias/best", tmp_path / "studies")
    best = df[df["state"] == "COMPLETE"].sort_values("val_bpd")["trial"].iloc[0]
    assert where.startswith(f"trial {best} of study alias")


@pytest.mark.parametrize("ref, message", [("aux3", "expected STUDY/N"), ("nostudy/3", "no study 'nostudy'")])
def test_from_trial_errors_are_one_line(tmp_path, ref, message):
    res = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "train", "--from-trial", ref, "--studies-dir",
                          str(tmp_path / "studies"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_an_exhausted_finite_space_stops_the_search_and_says_so(tmp_path):
    spec = dict(TINY, study="small", structure={"n_aux": [0]}, hyper={"gamma": [0.01, 0.04]},
                sampler={"name": "random", "seed": 0}, n_trials=5)
    res = _run(tmp_path, spec)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "search space exhausted: all 1 distinct configurations have been tried" in res.stderr
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard")
    assert list(df["state"]) == ["COMPLETE"]


def _study_with(outcomes: list[tuple[str, dict]]) -> optuna.Study:
    study = optuna.create_study()
    for outcome, attrs in outcomes:
        t = study.ask()
        t.set_user_attr("final", True)
        t.set_user_attr("outcome", outcome)
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, 1.0)
    return study


def test_stop_rule_does_not_count_duplicates():
    spec = _spec(n_trials=3)
    study = _study_with([("COMPLETE", {"config_hash": "a"}), ("DUPLICATE", {"config_hash": "a"}),
                         ("COMPLETE", {"config_hash": "b"})])
    from mdmsearch.search.study import count_trials

    counts = count_trials(study)
    assert counts["decided"] == 3 and counts["duplicates"] == 1 and budget_used(counts) == 2
    assert stop_reason(study, spec, counts, space_size=None) is None  # one more trial to go
    assert stop_reason(study, spec, counts, space_size=2).startswith("search space exhausted")
    assert "in a row" in stop_reason(study, spec, counts, space_size=None, repeats=MAX_REPEATS)
    study2 = _study_with([("COMPLETE", {"config_hash": h}) for h in "abc"])
    assert stop_reason(study2, spec, count_trials(study2), None).startswith("n_trials=3 reached")


def test_local_pruner_never_prunes_a_baseline():
    """Baselines report their curve (the yardstick) but are not pruned; a searched trial with
    the same curve is."""
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    good.report(1.0, 10)
    study.tell(good, 1.0)
    baseline, searched = study.ask(), study.ask()
    _optuna_reporter(baseline, prunable=False)(10, {"val_bpd": 9.0})  # worse than the median: kept
    with pytest.raises(StopTraining, match="pruned at step 10"):
        _optuna_reporter(searched)(10, {"val_bpd": 9.0})
    assert study.trials[baseline.number].intermediate_values == {10: 9.0}


def test_no_trial_is_pruned_at_its_last_step():
    """At the last step the budget is spent: the evaluation is reported (the pruner's yardstick
    for later trials) but the trial completes.  A trial told PRUNED had run all its steps."""
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    good.report(1.0, 20)
    good.report(1.0, 30)
    study.tell(good, 1.0)
    late = study.ask()
    _optuna_reporter(late, last_step=30)(30, {"val_bpd": 9.0})  # worse than the median, but done
    assert study.trials[late.number].intermediate_values == {30: 9.0}
    with pytest.raises(StopTraining, match="pruned at step 20"):
        _optuna_reporter(study.ask(), last_step=30)(20, {"val_bpd": 9.0})


def test_a_known_invalid_structure_is_answered_not_counted(tmp_path):
    """A structure already rejected as INVALID is answered as a duplicate of that trial, whatever
    its hyperparameters (it cannot train): it costs no budget; invalid trials are told to
    Optuna as pruned so that TPE, which ignores failed trials, learns to avoid them."""
    spec = dict(TINY, study="inv", structure={"n_aux": [3], "q_patterns": ["chain"], "d_patterns": ["last", "full"]},
                hyper={"process_lr": [0.01, 0.03]}, sampler={"name": "grid", "seed": 4}, n_trials=3)
    res = _run(tmp_path, spec)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "studies" / "leaderboard").sort_values("trial")
    states = list(df["state"])
    assert sorted(states) == ["COMPLETE", "COMPLETE", "DUPLICATE", "INVALID"], df[["trial", "state", "d_pattern"]]
    invalid = df[df["state"] == "INVALID"].iloc[0]
    dup = df[df["state"] == "DUPLICATE"].iloc[0]
    assert dup["d_pattern"] == invalid["d_pattern"] == "last" and int(dup["duplicate_of"]) == int(invalid["trial"])
    assert dup["process_lr"] != invalid["process_lr"] and "invalid" in dup["reason"]
    study = optuna.load_study(study_name="inv", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "studies" / "inv" / "journal.log"))))
    told = {t.number: t.state.name for t in study.trials}
    assert told[int(invalid["trial"])] == "PRUNED" and told[int(dup["trial"])] == "PRUNED"


def test_a_hyperparameter_declared_once_reaches_every_use(monkeypatch, tmp_path):
    """The space is declared once (search/dimensions.py): one added dimension is suggested,
    lands in the run config, is hashed, fixed for baselines, walked by the grid sampler, shown
    and counted by the dry run."""
    from mdmsearch.search import dimensions
    from mdmsearch.search.dimensions import Dim
    from mdmsearch.search.plan import baseline_params, suggest_plan
    from mdmsearch.search.space import enumerate_space
    from mdmsearch.search.study import grid_space

    spec = SearchSpec.model_validate({"study": "d", "studies_dir": str(tmp_path), "baselines": ["vpsde"],
                                      "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full"]}})
    before = enumerate_space(spec, check=False).configs
    ema = Dim("ema", "hyper", lambda s: [0.999, 0.99], ("optim", "ema"))
    monkeypatch.setattr(dimensions, "HYPER_DIMENSIONS", (*dimensions.HYPER_DIMENSIONS, ema))
    plans = {v: suggest_plan(optuna.trial.FixedTrial({"ema": v}), spec) for v in (0.999, 0.99)}
    assert plans[0.99].run_config(spec).optim.ema == 0.99 and plans[0.999].run_config(spec).optim.ema == 0.999
    assert plans[0.99].config_hash(spec) != plans[0.999].config_hash(spec)
    assert baseline_params(spec, 0)["ema"] == 0.999
    assert grid_space(spec)["ema"] == [0.999, 0.99]
    summary = enumerate_space(spec, check=False)
    assert summary.hyper["ema"] == "2 choices [0.999, 0.99]" and summary.configs == 2 * before
