"""Paired comparisons: common random numbers in evaluation, per-example files, verdicts,
distinct seeds as the only replicates, and the leaderboard's difference to the best baseline."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdmsearch.compare import (
    PER_EXAMPLE_FILE,
    TIE,
    distinct_seeds,
    paired,
    read_per_example,
    seed_mean,
    verdict,
)
from mdmsearch.data import load_dataset
from mdmsearch.diffusion import preset
from mdmsearch.leaderboard import ranked, read_tree, write_trial
from mdmsearch.objectives import GaussianStats, ResidualEps, make_time_sampler, residual_stats
from mdmsearch.training.evaluate import data_moments, evaluate_bpd


class Zero(torch.nn.Module):
    def forward(self, z, t):
        return torch.zeros_like(z)


def test_verdicts():
    assert verdict(-0.03, 0.01) == "better"
    assert verdict(0.03, 0.01) == "worse"
    assert verdict(0.019, 0.01) == TIE and verdict(-0.02, 0.01) == TIE  # |diff| <= 2 SE
    assert verdict(float("nan"), 0.01) == TIE


def test_paired_se_is_the_se_of_the_differences():
    rng = np.random.default_rng(0)
    common = rng.normal(2.0, 1.0, 500)  # shared per-example difficulty
    a = common + rng.normal(0, 0.05, 500) - 0.02
    b = common + rng.normal(0, 0.05, 500)
    c = paired(a, b)
    diff = a - b
    assert c.diff == pytest.approx(diff.mean()) and c.se == pytest.approx(diff.std(ddof=1) / math.sqrt(500))
    assert c.se < 0.1 * math.sqrt((a.var() + b.var()) / 500)  # pairing removes the shared part
    assert c.verdict == "better"
    assert paired(a, b[:10]) is None and paired(None, b) is None


class Recorder(torch.nn.Module):
    """A zero residual network that records the times and x-blocks it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t):
        self.calls.append((t.detach().clone(), z[:, 0].detach().clone()))
        return torch.zeros_like(z)


def test_evaluation_uses_common_random_numbers_across_processes():
    """Two processes with different numbers of variables, evaluated with one seed, see the same
    times and the same dequantized data (with one shared generator the eps draws of n = 3 would
    shift every later draw)."""
    data = load_dataset("digits", seed=0)
    stats = GaussianStats(*residual_stats(*data_moments(data.train, data.levels, torch.Generator().manual_seed(0)),
                                          "global"))
    val = data.val[:96]
    nets = {}
    for name in ("vpsde", "malda"):
        proc = preset(name)
        nets[name] = Recorder()
        sampler = make_time_sampler("vp", proc, t_min=1e-3)
        evaluate_bpd(proc, ResidualEps(nets[name], stats), val, data.levels, time_sampler=sampler,
                     batch_size=32, n_t=2, seed=5)
    a, b = nets["vpsde"].calls, nets["malda"].calls
    assert len(a) == len(b) == 3 * 3  # 3 batches x (2 strata + the truncation term)
    truncation_calls = 0
    for (ta, xa), (tb, xb) in zip(a, b):
        torch.testing.assert_close(ta, tb)
        if abs(float(ta[0]) - 1e-3) < 1e-7:  # truncation term: z_x = x + O(sqrt(t_min)) noise for both
            truncation_calls += 1
            assert float((xa - xb).abs().mean()) < 0.05
    assert truncation_calls == 3
    # and a different seed gives different times
    other = Recorder()
    evaluate_bpd(preset("vpsde"), ResidualEps(other, stats), val, data.levels,
                 time_sampler=make_time_sampler("vp", preset("vpsde"), t_min=1e-3), batch_size=32, n_t=2, seed=6)
    assert not torch.equal(other.calls[0][0], a[0][0])


def _write_run(root: Path, name: str, bpd: np.ndarray) -> Path:
    run = root / name
    run.mkdir(parents=True)
    half = len(bpd) // 2
    pd.DataFrame({"split": ["val"] * half + ["test"] * (len(bpd) - half),
                  "index": list(range(half)) + list(range(len(bpd) - half)),
                  "bpd": bpd, "n_t": 8}).sample(frac=1.0, random_state=0).to_parquet(run / PER_EXAMPLE_FILE)
    return run


def test_read_per_example_orders_val_then_test(tmp_path):
    bpd = np.arange(10, dtype=float)
    run = _write_run(tmp_path, "r", bpd)
    np.testing.assert_array_equal(read_per_example(run), bpd)
    assert read_per_example(tmp_path / "missing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / PER_EXAMPLE_FILE).write_bytes(b"not parquet")
    assert read_per_example(tmp_path / "bad") is None
    np.testing.assert_allclose(seed_mean([bpd, bpd + 2, None]), bpd + 1)


def test_distinct_seeds_are_the_only_replicates():
    df = pd.DataFrame({"group": ["g", "g", "g", "h"], "seed": [0, 0, 1, 0], "trial": [3, 1, 2, 4]})
    out = distinct_seeds(df)
    assert sorted(zip(out["group"], out["seed"], out["trial"])) == [("g", 0, 1), ("g", 1, 2), ("h", 0, 4)]


def _row(trial, baseline, group, seed, val, art, study="s"):
    return {"trial": trial, "state": "COMPLETE", "baseline": baseline, "seed": seed, "process": baseline or "learned",
            "n_aux": 0 if baseline else 1, "config_group": group, "config_hash": f"{group}-{seed}", "lr": 2e-3,
            "process_lr": 1e-2, "gamma": 0.01, "beta_1": 10.0, "time_sampler": "vp", "parameterization": "mixed",
            "residual_stats": "floored", "val_bpd": val, "test_bpd": val, "artifact_dir": str(art), "steps": 10}


def test_leaderboard_reports_structure_verdicts_against_the_best_baseline(tmp_path):
    """The leaderboard's verdict is about structures: over seeds, with their number; one seed is
    'not decided' (never 'better'), whatever the example-paired SE of that one run says."""
    rng = np.random.default_rng(1)
    common = rng.normal(2.0, 0.5, 400)
    root = tmp_path / "lb"
    trial = 0
    for group, shift, seeds in (("B", 0.0, 3), ("L", -0.05, 3), ("T", 0.0, 3), ("ONE", -0.05, 1)):
        for seed in range(seeds):
            run = _write_run(tmp_path / "art", f"{group}{seed}",
                             common + shift + rng.normal(0, 0.005) + rng.normal(0, 0.02, 400))
            write_trial(root, "digits", "s", _row(trial, "vpsde" if group == "B" else None, group, seed,
                                                  2.0 + shift + (0.001 if group == "T" else 0), run))
            trial += 1
    # the same seed of "L" again in another study: one replicate, not two
    write_trial(root, "digits", "t", _row(0, None, "L", 0, 1.95, tmp_path / "art" / "L0", study="t"))
    view = ranked(read_tree(root)).set_index("config_group")
    assert view.loc["L", "n"] == 3
    assert view.loc["L", "verdict"] == "better" and view.loc["L", "vs_baseline"] == pytest.approx(-0.05, abs=0.015)
    assert 0 < view.loc["L", "vs_baseline_se"] < 0.02 and view.loc["L", "p_better"] == 1.0
    assert view.loc["T", "verdict"] == TIE
    assert view.loc["ONE", "verdict"] == "not decided (1 seed)" and pd.isna(view.loc["ONE", "vs_baseline_se"])
    assert view.loc["ONE", "vs_baseline"] < 0
    assert view.loc["B", "vs_baseline"] == 0.0 and view.loc["B", "verdict"] == TIE


def test_rows_written_before_a_column_existed_read_as_null(tmp_path):
    """Schema version 1 rows (no parameterization column) and version 2 rows form one table."""
    root = tmp_path / "lb"
    part = root / "dataset=digits" / "study=old"
    part.mkdir(parents=True)
    pd.DataFrame({"trial": [0], "state": ["COMPLETE"], "val_bpd": [2.0]}).to_parquet(part / "trial-0.parquet")
    write_trial(root, "digits", "new", _row(1, "vpsde", "B", 0, 2.0, tmp_path))
    df = read_tree(root).set_index("trial")
    assert df.loc[1, "parameterization"] == "mixed" and pd.isna(df.loc[0, "parameterization"])


def test_a_seed_run_in_two_studies_is_listed_but_counted_once(tmp_path):
    art = _write_run(tmp_path / "art", "r", np.full(10, 2.0))
    root = tmp_path / "lb"
    write_trial(root, "digits", "a", _row(0, "vpsde", "B", 0, 2.0, art))
    write_trial(root, "digits", "b", _row(3, "vpsde", "B", 0, 2.0, art, study="b"))
    row = ranked(read_tree(root)).iloc[0]
    assert row["n"] == 1 and row["studies"] == "a,b" and row["trials"] == "0,3"


# ---------------------------------------------------------------------- structure comparisons
def _runs(rng, mean, seeds, n=200, seed_sd=0.02, noise=0.01, common=None):
    """Per-example BPDs of one configuration's runs: each seed shifts the whole run."""
    common = rng.normal(2.0, 0.5, n) if common is None else common
    return {s: common + mean + rng.normal(0, seed_sd) + rng.normal(0, noise, n) for s in seeds}


def test_a_structure_verdict_needs_two_seeds_each():
    from mdmsearch.compare import compare_structures

    rng = np.random.default_rng(0)
    common = rng.normal(2.0, 0.5, 200)
    a = _runs(rng, -0.5, [0], common=common)
    b = _runs(rng, 0.0, [0, 1, 2], common=common)
    c = compare_structures(a, b)
    assert c.kind == "structure" and not c.decided and c.verdict == "not decided (1 seed)"
    assert "better" not in c.describe() and c.diff < -0.4 and c.p_better == 1.0
    assert c.as_dict()["se"] is None and c.n_seeds == 1
    assert paired(a[0], b[0]).verdict == "better"  # the model comparison of the same runs decides


def test_structure_se_is_the_spread_over_seeds():
    """Paired by seed when both ran the same seeds (SE over the seed differences, df = n - 1),
    Welch otherwise; the example-paired SE of the seed means is far smaller and says nothing."""
    from mdmsearch.compare import compare_structures, run_means

    rng = np.random.default_rng(1)
    common = rng.normal(2.0, 0.5, 300)
    a = _runs(rng, 0.0, [0, 1, 2, 3], n=300, common=common)
    b = _runs(rng, 0.0, [0, 1, 2, 3], n=300, common=common)
    c = compare_structures(a, b)
    ma, mb = run_means(a), run_means(b)
    d = np.array([ma[s] - mb[s] for s in range(4)])
    assert c.paired_by_seed and c.df == 3 and c.se == pytest.approx(d.std(ddof=1) / 2)
    assert c.se > 5 * paired(seed_mean(a.values()), seed_mean(b.values())).se
    w = compare_structures(a, {s + 10: v for s, v in b.items()})
    va, vb = np.array(list(ma.values())), np.array(list(mb.values()))
    assert not w.paired_by_seed and w.se == pytest.approx(math.sqrt(va.var(ddof=1) / 4 + vb.var(ddof=1) / 4))
    assert 2.5 < w.df <= 6
    assert w.threshold == pytest.approx(__import__("scipy").stats.t.ppf(0.975, w.df) * w.se)
    assert compare_structures(a, {0: b[0][:10], 1: b[1][:10]}) is None  # other examples


def test_structure_verdicts_are_calibrated_on_simulated_seeds():
    """Same-configuration pairs are called different at about the nominal 5% (the t test's few
    degrees of freedom included), while the example-paired SE calls most of them different;
    a real difference of 4 seed standard deviations is detected most of the time with 3 seeds."""
    from mdmsearch.compare import compare_structures

    rng = np.random.default_rng(2)
    common = rng.normal(2.0, 0.5, 100)
    reps = 400
    false = naive = detected = 0
    for _ in range(reps):
        a = _runs(rng, 0.0, [0, 1, 2], n=100, common=common)
        b = _runs(rng, 0.0, [3, 4, 5], n=100, common=common)
        false += compare_structures(a, b).verdict != TIE
        naive += paired(seed_mean(a.values()), seed_mean(b.values())).verdict != TIE
        real = _runs(rng, -0.08, [3, 4, 5], n=100, common=common)
        detected += compare_structures(real, b).verdict == "better"
    assert false / reps < 0.09 and naive / reps > 0.5
    assert detected / reps > 0.5
