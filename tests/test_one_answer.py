"""One answer, everywhere a user looks: after a study confirms its winner, `status`, `leaderboard`,
`report`, `compare STUDY/best+seeds STUDY/baseline+seeds` and `train --from-trial STUDY/best` name
the same winner and the same selection-free margin.  A real tiny study (digits, 20 steps, with a
confirmation), then every command as a user runs it; plus the ranking rule on rows with known
numbers, and `train --resume` continuing a run directory's own configuration."""

import json
import logging
import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.cli import main
from mdmsearch.compare import PER_EXAMPLE_FILE
from mdmsearch.leaderboard import (CONFIRMATION_FILE, ranked, read_confirmations, read_tree, write_confirmation,
                                   write_trial)
from mdmsearch.report.data import anytime
from mdmsearch.search.confirm import headline
from mdmsearch.search.study import make_storage

SPEC = {"study": "one", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
        "budget": {"steps": 20, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
                   "test_n_t": 2, "quality": None},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
        "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full"]},
        "hyper": {"process_lr": [0.01, 0.03]},
        "baselines": ["vpsde", "cld"], "n_trials": 4, "workers": 1,
        "confirm": {"seeds": 2, "top_k": 2, "test_n_t": 4}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study run by `mdmsearch run` (one worker, in this process), in its own directory (the
    commands read studies/ there); the ended confirmation's stored result."""
    base = tmp_path_factory.mktemp("one-answer")
    (base / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        try:
            assert main(["-q", "run", "spec.yaml"]) == 0
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            logging.captureWarnings(False)
    storage = make_storage(f"journal:{base / 'studies/one/journal.log'}")
    info = optuna.load_study(study_name="one", storage=storage).user_attrs["confirmation"]
    assert info["winner"] and info["vs_baseline"] is not None, info
    return base, info


@pytest.fixture
def cli(study, monkeypatch, capsys, restore_logging):
    """``mdmsearch -q ARGS`` in the study's directory: (exit code, stdout, stderr)."""
    base, _ = study
    monkeypatch.chdir(base)

    def run(*args):
        code = main(["-q", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_every_view_names_the_confirmed_winner_and_its_margin(study, cli):
    base, info = study
    line = headline(info)  # winner (confirmed): LABEL: DIFF [LO, HI] bpd vs BASELINE on fresh seeds [...], test split: ...
    label, margin, seeds = info["winner"]["label"], info["vs_baseline"], info["fresh_seeds"]
    assert line.startswith(f"winner (confirmed): {label}: {margin['diff']:+.4f} [") and "test split" in line

    code, out, _ = cli("status", "one")  # status leads with it
    assert code == 0 and line in out.splitlines()
    code, out, _ = cli("status", "one", "--format", "json")
    st = json.loads(out)
    assert st["winner"]["label"] == label and st["winner"]["source"] == "confirmation"
    assert st["winner"]["seeds"] == seeds and st["winner"]["margin"]["diff"] == margin["diff"]

    code, out, _ = cli("leaderboard", "--dataset", "digits")
    assert code == 0 and f"one: {line}" in out.splitlines()
    code, out, _ = cli("leaderboard", "--dataset", "digits", "--format", "json")
    top = json.loads(out)[0]
    assert (top["tier"], top["label"], top["seeds"], top["n"]) == ("winner", label, "fresh", len(seeds))
    assert top["vs_baseline"] == pytest.approx(margin["diff"], abs=1e-12)
    assert top["ci_low"] == pytest.approx(margin["ci_low"], abs=1e-12)
    assert top["ci_high"] == pytest.approx(margin["ci_high"], abs=1e-12)
    assert top["verdict"] == margin["verdict"] and top["margin_on"] == "fresh seeds, test"

    code, out, _ = cli("report", "--dataset", "digits")
    readme = (base / "reports" / "digits" / "README.md").read_text()
    assert code == 0 and f"**{line}**" in readme
    first = next(r for r in readme.splitlines() if r.startswith("| 1 |"))
    assert "| fresh |" in first and f"{margin['diff']:+.3f} [" in first

    code, out, _ = cli("compare", "one/best+seeds", "one/baseline+seeds", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["split"] == "test" and doc["a"]["seeds"] == seeds and doc["b"]["seeds"] == seeds
    assert doc["structure"]["diff"] == pytest.approx(margin["diff"], abs=1e-12)
    assert doc["structure"]["verdict"] == margin["verdict"]

    winner_trial = st["winner"]["trial"]
    code, out, err = cli("train", "--from-trial", "one/best", "--steps", "2", "--eval-every", "2", "--n-samples", "0",
                         "--out", base / "promoted", "-v")
    assert code == 0, err[-2000:]
    assert f"training the configuration of trial {winner_trial} of study one" in err and label in err
    promoted = yaml.safe_load((base / "promoted" / "config.yaml").read_text())
    trained = yaml.safe_load((base / "studies/one/trials" / str(winner_trial) / "config.yaml").read_text())
    assert promoted["process"] == trained["process"] and promoted["optim"] == trained["optim"]
    assert trained["train"]["seed"] in seeds  # a fresh seed of the winner, not a lucky search seed


def test_confirm_without_flags_keeps_the_studys_own_race(study, cli):
    """`mdmsearch confirm STUDY` defaults to the race the study ran (its seeds and candidates): on
    an ended race it trains no new round and answers the same winner and margin (before, its
    fixed default of 3 seeds reopened this 2-seed race and ignored aux3's 16-seed one)."""
    base, info = study
    stored = base / "studies" / "leaderboard" / "dataset=digits" / "study=one" / CONFIRMATION_FILE
    before = (stored.read_bytes(), stored.stat().st_mtime_ns)
    code, out, err = cli("confirm", "one", "--format", "json")
    assert code == 0, err[-2000:]
    doc = json.loads(out)
    assert doc["result"]["fresh_seeds"] == info["fresh_seeds"] and doc["result"]["horizons"] == [2]
    assert doc["result"]["vs_baseline"]["diff"] == pytest.approx(info["vs_baseline"]["diff"], abs=1e-12)
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before  # never emptied on the way


def test_best_is_a_searched_configuration_never_a_confirmation_or_baseline_trial(study):
    _, info = study
    base, _ = study
    storage = make_storage(f"journal:{base / 'studies/one/journal.log'}")
    s = optuna.load_study(study_name="one", storage=storage)
    from mdmsearch.search.answer import best_searched, reference_baseline, winner

    w, searched, ref = winner(s), best_searched(s), reference_baseline(s)
    trials = {t.number: t for t in s.trials}
    assert trials[w.trial].user_attrs.get("confirm") and not trials[w.trial].user_attrs.get("baseline")
    assert w.group == info["winner"]["group"] and ref.group == info["baseline"]["group"]
    assert trials[ref.trial].user_attrs.get("baseline")
    assert not trials[searched.trial].user_attrs.get("confirm") and not trials[searched.trial].user_attrs.get("baseline")


def test_the_anytime_curve_counts_search_trials_only(study):
    base, _ = study
    df = read_tree(base / "studies" / "leaderboard", "digits")
    assert df["confirm_round"].notna().sum() >= 4  # the confirmation's trials have rows ...
    runs = anytime(df)
    assert set(runs["trial"]) == set(df[df["confirm_round"].isna()]["trial"])  # ... but are no search progress


# ---------------------------------------------------------------------- the ranking rule, known numbers
N = 40
BASE = np.random.default_rng(3).normal(3.0, 0.3, 2 * N)


def _row(root, n, group, seed, val, *, baseline=None, confirm_round=None, params=None):
    art = root / "runs" / str(n)
    art.mkdir(parents=True)
    shift = val - BASE[:N].mean()
    pd.DataFrame({"split": ["val"] * N + ["test"] * N, "index": list(range(N)) * 2,
                  "bpd": BASE + shift + np.random.default_rng(n).normal(0, 0.01, 2 * N)}).to_parquet(art / PER_EXAMPLE_FILE)
    write_trial(root / "lb", "digits", "s", {
        "trial": n, "state": "COMPLETE", "seed": seed, "config_group": group, "config_hash": f"{group}-{seed}",
        "artifact_dir": str(art), "val_bpd": val, "test_bpd": val, "baseline": baseline, "n_aux": 0 if baseline else 1,
        "q_pattern": "chain", "d_pattern": "diag", "d_param": "cholesky", "learn": True,
        "params": json.dumps(params or {"process_lr": 0.01}), "confirm_round": confirm_round})


def test_a_one_seed_mean_never_outranks_the_confirmed_winner(tmp_path):
    """A lucky one-seed configuration (2.90) sits below the confirmed winner (3.00 on fresh seeds,
    3.01 with its selecting seed) and the raced baseline; labels tell apart two configurations of
    one structure; the winner's margin is over its fresh seeds, test split."""
    _row(tmp_path, 0, "W", 0, 2.95, params={"process_lr": 0.03})
    _row(tmp_path, 1, "W", 1000, 3.00, confirm_round=1, params={"process_lr": 0.03})
    _row(tmp_path, 2, "W", 1001, 3.02, confirm_round=2, params={"process_lr": 0.03})
    _row(tmp_path, 3, "B", 0, 3.10, baseline="vpsde")
    _row(tmp_path, 4, "B", 1000, 3.08, baseline="vpsde", confirm_round=1)
    _row(tmp_path, 5, "B", 1001, 3.12, baseline="vpsde", confirm_round=2)
    _row(tmp_path, 6, "L", 0, 2.90, params={"process_lr": 0.01})  # the same structure, another lr: lucky
    info = {"winner": {"group": "W", "label": "w"}, "baseline": {"group": "B", "label": "b"}}
    write_confirmation(tmp_path / "lb", "digits", "s", info)
    assert (tmp_path / "lb/dataset=digits/study=s" / CONFIRMATION_FILE).is_file()
    df = read_tree(tmp_path / "lb", "digits")  # the file is not a row
    assert len(df) == 7
    view = ranked(df, confirmations=read_confirmations(tmp_path / "lb", "digits"))
    assert list(view["config_group"]) == ["W", "B", "L"] and list(view["tier"]) == ["winner", "raced", "searched"]
    w = view.iloc[0]
    assert (w["n"], w["seeds"], w["all_n"]) == (2, "fresh", 3)
    assert w["val_bpd"] == pytest.approx(3.01) and w["all_val_bpd"] == pytest.approx((2.95 + 3.00 + 3.02) / 3)
    assert w["vs_baseline"] == pytest.approx(3.01 - 3.10, abs=0.01) and w["margin_on"] == "fresh seeds, test"
    assert w["label"] != view.iloc[2]["label"] and "process_lr=0.03" in w["label"]
    assert view.iloc[2]["margin_on"] == "search seeds, held-out"
    # without the confirmation (e.g. reopened: an empty file), the lucky one-seed mean ranks by value again
    write_confirmation(tmp_path / "lb", "digits", "s", {})
    plain = ranked(df, confirmations=read_confirmations(tmp_path / "lb", "digits"))
    assert set(plain["tier"]) == {"raced", "searched"}


# ---------------------------------------------------------------------- resume a run directory
def test_resume_continues_the_run_directorys_own_configuration(tmp_path, capsys, restore_logging):
    out = tmp_path / "run"
    flags = ["--process", "learned", "--n-aux", "1", "--eval-every", "2", "--n-samples", "0", "--model", "mlp",
             "--dataset", "gaussian"]
    assert main(["-q", "train", "--out", str(out), "--steps", "2", *flags]) == 0
    first = yaml.safe_load((out / "config.yaml").read_text())
    capsys.readouterr()
    assert main(["-q", "train", "--resume", "--out", str(out), "--steps", "4"]) == 0  # no other flag needed
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert res["steps"] == 4 and again["process"] == first["process"] and again["train"]["steps"] == 4
    assert again["process"]["name"] == "learned" and again["process"]["n_aux"] == 1
    assert math.isfinite(res["val_bpd"])
    assert re.search(r"no checkpoint to resume", _error(tmp_path / "empty", capsys))


def _error(out, capsys) -> str:
    assert main(["-q", "train", "--resume", "--out", str(out)]) == 2
    assert not out.exists()
    return capsys.readouterr().err
