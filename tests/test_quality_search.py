"""Sample quality in runs, searches and reports: metrics.json and the leaderboard gain KID/FID
(with how they were measured), a spec can search BPD and KID together (two objectives), and the
report draws the Pareto front with the baselines."""

import json

import optuna
import pandas as pd
import pytest

from mdmsearch.config import parse_run_config
from mdmsearch.search.runner import run_local
from mdmsearch.search.spec import SearchSpec
from mdmsearch.search.study import make_storage
from mdmsearch.training import launch

QUALITY = {"n": 64, "nfe": 8, "sampler": "em", "seed": 7}


def test_a_run_scores_its_samples_at_the_stated_cost(tmp_path):
    cfg = parse_run_config({"process": {"name": "vpsde"}, "data": {"name": "digits"}, "model": {"size": "tiny"},
                            "optim": {"batch_size": 16},
                            "train": {"steps": 4, "eval_every": 4, "eval_examples": 16, "test_n_t": 2, "n_samples": 0,
                                      "progress": False, "quality": QUALITY}})
    launch.run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["kid"] > 0 and metrics["kid_se"] > 0 and metrics["fid"] > 0  # 4 steps: far from the data
    assert metrics["quality"]["nfe"] == 8 and metrics["quality"]["sampler"] == "em" and metrics["quality"]["n"] == 64
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["kid"].iloc[-1] == pytest.approx(metrics["kid"]) and history["kid"].iloc[:-1].isna().all()
    again = tmp_path / "again"  # the same run and seed: the same samples (common random numbers), the same score
    launch.run(cfg, again)
    assert json.loads((again / "metrics.json").read_text())["kid"] == pytest.approx(metrics["kid"], rel=1e-6)


def test_quality_settings_leave_the_study_and_trial_hashes_alone():
    base = {"study": "h", "budget": {"steps": 10}}
    a = SearchSpec.model_validate(base)
    b = SearchSpec.model_validate({**base, "budget": {"steps": 10, "quality": None}})
    assert a.spec_hash() == b.spec_hash()
    with pytest.raises(ValueError, match="objective.second: kid needs budget.quality"):
        SearchSpec.model_validate({**base, "budget": {"steps": 10, "quality": None}, "objective": {"second": "kid"}})


def test_a_two_objective_search_writes_both_columns_and_the_report_shows_the_front(tmp_path):
    spec = SearchSpec.model_validate({
        "study": "pareto", "studies_dir": str(tmp_path / "studies"), "data": {"name": "digits"},
        "model": {"name": "unet", "size": "tiny"}, "objective": {"second": "kid"},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
        "budget": {"steps": 6, "eval_every": 6, "eval_examples": 32, "batch_size": 16, "n_samples": 4,
                   "sample_steps": 4, "test_n_t": 2, "quality": QUALITY},
        "structure": {"n_aux": [1], "q_patterns": ["full"], "d_patterns": ["full", "last"]},
        "baselines": ["vpsde"], "n_trials": 3, "workers": 1})
    run_local(spec)
    study = optuna.load_study(study_name="pareto", storage=make_storage(f"journal:{spec.study_dir / 'journal.log'}"))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 2 and all(len(t.values) == 2 for t in done)
    rows = pd.read_parquet(tmp_path / "studies" / "leaderboard" / "dataset=digits" / "study=pareto")
    complete = rows[rows["state"] == "COMPLETE"]
    assert complete["kid"].notna().all() and complete["fid"].notna().all()
    by_trial = {t.number: t.values for t in done}
    for _, row in complete.iterrows():  # the study was told the KID the row holds
        assert by_trial[row["trial"]][1] == pytest.approx(row["kid"])
        assert json.loads(row["quality"])["nfe"] == QUALITY["nfe"]
    curves = pd.read_parquet(tmp_path / "studies" / "leaderboard-curves" / "dataset=digits" / "study=pareto")
    finals = curves.sort_values("step").groupby("trial").tail(1).set_index("trial")["kid"]
    assert all(finals[t] == pytest.approx(k) for t, k in zip(complete["trial"], complete["kid"]))

    from mdmsearch.report.build import build_report

    index = build_report(tmp_path / "studies" / "leaderboard", "digits", tmp_path / "reports",
                         studies_dir=tmp_path / "studies")
    text = (index.parent / "README.md").read_text()
    assert "Sample quality" in text and "Pareto:" in text and (index.parent / "pareto.png").is_file()
    assert "vpsde" in text.lower()


def test_the_pareto_front_is_the_non_dominated_set():
    from mdmsearch.report.data import Entry
    from mdmsearch.report.quality import QualityPoint, dominates

    def point(bpd, kid):
        return QualityPoint(Entry(label=f"{bpd}/{kid}", baseline=None, group=None, val_mean=bpd, n=1), {0: kid}, 0.0)

    pts = [point(1.0, 0.5), point(2.0, 0.1), point(2.5, 0.4), point(1.0, 0.6)]
    front = [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]
    assert [p.entry.label for p in front] == ["1.0/0.5", "2.0/0.1"]
