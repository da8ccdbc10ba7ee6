"""Coupling of the auxiliaries to the data: effective K and structure (docs/math.md, section 9),
on processes whose answer is known, and coupling.json of a run."""

import json
import logging
import math

import pytest
import torch

from mdmsearch.config import parse_run_config
from mdmsearch.diffusion import learned, preset
from mdmsearch.diffusion.coupling import THRESHOLD, coupling, precision, process_coupling, time_grid
from mdmsearch.diffusion.coupling import _smallest_set  # the set before bridges (checked against the full answer)
from mdmsearch.training import Trainer
from mdmsearch.training.artifacts import COUPLING_FILE, read_coupling, record_coupling, start_coupling
from mdmsearch.training.ema import EMA

DT = torch.float64


def test_precision_is_the_vpsde_closed_form():
    """VPSDE: Phi = e^{-B/2}, Sigma = 1 - e^{-B}, so J = e^{-B} / (1 - e^{-B})."""
    proc = preset("vpsde")
    t = time_grid()
    phi, sigma = proc.transition(t, given="x")
    big_b = proc.schedule.integral(t)
    expected = torch.exp(-big_b) / (1 - torch.exp(-big_b))
    assert torch.allclose(precision(phi[:, :, 0], sigma, [0]), expected, rtol=1e-10)


def test_precision_of_a_pair_is_the_gaussian_posterior_precision():
    """J from (x, v) equals 1 / Var(x0 | z_t) - 0 for a flat prior: checked against the explicit
    2 x 2 inverse for CLD, and it is at least what x alone gives (seeing more never loses)."""
    proc = preset("cld")
    phi, sigma = proc.transition(time_grid(n_t=8), given="x")
    f = phi[:, :, 0]  # [N, 2]
    det = sigma[:, 0, 0] * sigma[:, 1, 1] - sigma[:, 0, 1] ** 2
    explicit = (f[:, 0] ** 2 * sigma[:, 1, 1] - 2 * f[:, 0] * f[:, 1] * sigma[:, 0, 1] + f[:, 1] ** 2 * sigma[:, 0, 0]) / det
    both = precision(f, sigma, [0, 1])
    assert torch.allclose(both, explicit, rtol=1e-8)
    assert bool((both >= precision(f, sigma, [0]) * (1 - 1e-12)).all())


def test_shares_are_read_off_the_process_kernel():
    """``coupling`` builds the kernel given x from (Q, D, S_inf, gamma, B(t)) itself: its share is
    mean_t 1 - J_x / J_all of the process's own transition (S_inf and gamma not the defaults)."""
    proc = learned(2, init_noise=0.4, seed=2, gamma=0.04, s_x2=1.5, s_v2=0.7)
    t = time_grid()
    phi, sigma = proc.transition(t, given="x")
    f, sigma = phi[:, :, 0].detach(), sigma.detach()
    expected = float((1 - precision(f, sigma, [0]) / precision(f, sigma, [0, 1, 2])).mean())
    assert math.isclose(process_coupling(proc).share, expected, rel_tol=1e-9)


@pytest.mark.parametrize("name,k", [("cld", 1), ("alda", 2), ("malda", 2)])
def test_named_coupled_processes_keep_every_auxiliary(name, k):
    c = process_coupling(preset(name))
    assert c.n_aux == k and c.n_eff == k and not c.collapsed
    assert c.share > 0.3  # CLD 0.51, ALDA 0.90, MALDA 0.61 of the precision about x0 needs the auxiliaries
    assert all(u > THRESHOLD for u in c.unique)


def test_named_patterns_of_cld_and_vpsde():
    c = process_coupling(preset("cld"))
    assert (c.q_pattern, c.d_pattern, c.label) == ("chain", "last", "K=1 Q:chain D:last")
    v = process_coupling(preset("vpsde"))
    assert (v.n_aux, v.n_eff, v.share, v.collapsed) == (0, 0, 0.0, False)
    assert v.label == "K=0 (x alone, D_xx=0.5)"


@pytest.mark.parametrize("d_param,d_mask", [("diag", "diag"), ("full", [[1, 0, 0], [0, 1, 0], [0, 1, 1]])])
def test_auxiliaries_masked_off_from_x_have_effective_k_0(d_param, d_mask):
    """Q free only between the auxiliaries, D without x-aux entries: Phi and Sigma are block
    diagonal, so the auxiliaries hold exactly nothing about x0, whatever their values."""
    proc = learned(2, q_mask=[[0, 0, 0], [0, 0, 1], [0, 1, 0]], d_mask=d_mask, d_param=d_param, init_noise=0.5, seed=3)
    c = process_coupling(proc)
    assert c.share == 0.0 and c.unique == (0.0, 0.0)
    assert c.n_eff == 0 and c.collapsed and c.label.startswith("K=0 (x alone")


def test_an_auxiliary_reached_only_through_another_matters():
    """x - v1 - v2 (Q chain), noise only on v2: v2 reaches x through v1 alone, and it counts."""
    proc = learned(2, q_mask="chain", d_mask="last", d_param="full")
    c = process_coupling(proc)
    assert c.unique[1] > THRESHOLD and c.effective == (1, 2)


def test_bridges_join_the_effective_set():
    """K = 3 chain with a weak x - v1 link (0.15): seeing v1 and v3 is enough (their information
    came through v2), but v2 carries it, so the effective set is all three."""
    proc = learned(3, "chain", "diag", d_param="diag", q_init=-1.0, d_init=0.7)
    with torch.no_grad():
        proc.q_module.u[0, 1] = 0.15
    c = process_coupling(proc)
    phi, sigma = proc.transition(time_grid(), given="x")
    f = phi[:, :, 0].detach()
    j_all = precision(f, sigma.detach(), [0, 1, 2, 3])
    assert _smallest_set(j_all, f, sigma.detach(), 3, THRESHOLD) == (1, 3)
    assert c.effective == (1, 2, 3) and c.q_pattern == "chain"


def test_the_link_to_x_stays_in_the_effective_structure():
    """x - v1 = 1 is 4% of the largest entry (D_v2 = 25), under the 5% entry threshold, yet v1 and
    v2 hold 36% of the precision: the link on their path to x is part of the effective Q."""
    proc = learned(2, "chain", "diag", d_param="diag", q_init=-1.0, d_init=[1.0, 1.0, 25.0])
    with torch.no_grad():
        proc.q_module.u[1, 2] = 5.0
    c = process_coupling(proc)
    assert c.n_eff == 2 and c.share > 0.3
    assert (c.q_pattern, c.d_pattern) == ("chain", "last")


def test_a_weak_x_link_collapses_and_a_strong_one_does_not():
    """The issue's case: K = 3, Q chain, D diag with |Q_x,v1| = 0.008 reads as K = 0 (x alone);
    with the initial |Q_x,v1| = 1 all three auxiliaries count."""
    shares = {}
    for q_xv in (1.0, 0.008):
        proc = learned(3, "chain", "diag", d_param="diag", q_init=-1.0, d_init=0.7)
        with torch.no_grad():
            proc.q_module.u[0, 1] = q_xv
        shares[q_xv] = process_coupling(proc)
    assert shares[1.0].n_eff == 3 and not shares[1.0].collapsed
    assert shares[0.008].n_eff == 0 and shares[0.008].collapsed and shares[0.008].share < 1e-3


def test_coupling_is_relative_to_the_process_scale():
    """Q, D times c with B(t) / c is the same kernel: the same shares and the same structure."""
    proc = learned(2, init_noise=0.6, seed=5)
    q, d = proc.Q.detach(), proc.D.detach()
    big_b = proc.schedule.integral(time_grid())
    base = coupling(q, d, big_b=big_b)
    scaled = coupling(4.0 * q, 4.0 * d, big_b=big_b / 4.0)
    assert math.isclose(base.share, scaled.share, rel_tol=1e-8)
    assert base.effective == scaled.effective and base.label.split(" D_xx")[0] == scaled.label.split(" D_xx")[0]


def _trained(tmp_path, steps=30):
    cfg = parse_run_config({
        "process": {"name": "learned", "n_aux": 1},
        "data": {"name": "gaussian"},
        "model": {"size": "tiny"},
        "optim": {"batch_size": 64, "lr": 3e-3, "process_lr": 0.01},
        "train": {"steps": steps, "eval_every": 10, "eval_examples": 128, "n_samples": 0, "progress": False,
                  "test_n_t": 2, "eval_n_t": 2},
    })
    tr = Trainer(cfg, tmp_path)
    return tr, tr.fit()


def test_a_trained_process_zeroed_by_hand_reads_as_collapsed(tmp_path):
    """A trained learned K = 1 process is coupled; with its x-aux entries of Q and of D's factor
    zeroed by hand it is x alone (effective K = 0).  The run's coupling.json has the start, one
    entry per evaluation and the end, which is what metrics.json reports."""
    tr, metrics = _trained(tmp_path)
    assert metrics["coupling"]["n_eff"] == 1 and not metrics["coupling"]["collapsed"]
    data = json.loads((tmp_path / COUPLING_FILE).read_text())
    assert data["start"]["step"] == 0 and data["start"]["Q"][0][1] == -1.0  # q_init
    assert [h["step"] for h in data["history"]] == [10, 20, 30]
    assert data["end"]["label"] == metrics["coupling"]["label"] and data["end"]["Q"] == metrics["Q"]
    with torch.no_grad():
        tr.process.q_module.u[0, 1] = 0.0
        tr.process.d_module.l[1, 0] = 0.0  # D = L L^T: no x-v entry
    c = process_coupling(tr.process)
    assert c.share == 0.0 and c.n_eff == 0 and c.collapsed


def test_record_coupling_replaces_later_steps_and_survives_a_damaged_file(tmp_path, caplog):
    proc = learned(1)
    ema = EMA(list(proc.parameters()), 0.9)
    start_coupling(tmp_path, proc)
    for step in (10, 20, 30):
        record_coupling(tmp_path, step, proc, ema)
    record_coupling(tmp_path, 20, proc, ema)  # a run resumed from step 10 evaluates at 20 again
    data = read_coupling(tmp_path)
    assert [h["step"] for h in data["history"]] == [10, 20] and data["start"]["step"] == 0
    (tmp_path / COUPLING_FILE).write_text("{torn")
    with caplog.at_level(logging.WARNING):
        assert read_coupling(tmp_path) == {"start": None, "history": [], "end": None}
    assert "unreadable" in caplog.text


def test_record_coupling_measures_the_ema_process(tmp_path):
    """The history is of the reported (EMA) Q, not the live one."""
    proc = learned(1)
    ema = EMA(list(proc.parameters()), 0.9)  # shadow: the initial U = -1
    with torch.no_grad():
        proc.q_module.u[0, 1] = 0.0  # live Q: x alone
    record_coupling(tmp_path, 5, proc, ema)
    entry = read_coupling(tmp_path)["history"][0]
    assert entry["Q"][0][1] == -1.0 and entry["n_eff"] == 1
    assert float(proc.q_module.u.detach()[0, 1]) == 0.0  # the live value is back


# ---------------------------------------------------------------------- where users look
def _rows(effs, n_aux=3, group="g"):
    import pandas as pd

    return pd.DataFrame({"dataset": "digits", "config_group": group, "group": group, "state": "COMPLETE",
                         "n_aux": n_aux, "eff_n_aux": effs, "baseline": None,
                         "eff_structure": [f"K={k}" for k in effs], "aux_share": [0.001 * (k + 1) for k in effs]})


@pytest.mark.parametrize("effs,eff,collapsed", [([0, 0], 0, True), ([0, 3], 3, False)])
def test_with_effective_reports_a_collapse_only_when_every_seed_collapsed(effs, eff, collapsed):
    import pandas as pd

    from mdmsearch.leaderboard import with_effective

    view = pd.DataFrame({"dataset": ["digits"], "config_group": ["g"], "n_aux": [3]})
    out = with_effective(_rows(effs), view)
    assert int(out["eff_n_aux"][0]) == eff and bool(out["collapsed"][0]) is collapsed
    assert out["eff_structure"][0] == f"K={eff}"


def test_coupling_columns_come_from_metrics():
    from mdmsearch.search.runner import coupling_columns

    c = process_coupling(learned(3, "chain", "diag", d_param="diag", q_init=0.0)).to_dict()
    cols = coupling_columns({"coupling": c})
    assert (cols["eff_n_aux"], cols["eff_structure"], cols["aux_share"]) == (0, c["label"], 0.0)
    assert json.loads(cols["coupling"])["n_aux"] == 3
    assert coupling_columns({}) == {}  # a run from before the coupling was measured


def test_status_lines_say_when_top_configurations_collapse():
    from mdmsearch.search.cli import _effective_lines

    top = [{"label": "a", "n_aux": 3, "eff_n_aux": 0, "eff_structure": "K=0 (x alone, D_xx=0.7)", "aux_share": 2e-4,
            "learned": True},
           {"label": "b", "n_aux": 1, "eff_n_aux": 1, "eff_structure": "K=1 Q:chain D:last", "aux_share": 0.5,
            "learned": False}]
    lines = _effective_lines({"top": top, "learned": 1, "collapsed": 1})
    assert "1 of the 1 learned configuration(s) among the top 2 collapse" in lines[0]
    assert lines[1].startswith("  1. searched K=3 -> effective K=0: K=0 (x alone")
    assert "collapse" not in _effective_lines({"top": top[1:], "learned": 0, "collapsed": 0})[0]


def test_report_headline_and_table_show_the_effective_k():
    from mdmsearch.report import data as D
    from mdmsearch.report.effective import annotate_effective, collapse_sentence
    from mdmsearch.report.render import TABLE_HEADERS, table_cells

    entries = [D.Entry(label="learned K=3", baseline=None, group="g", rank=1, n_aux=3, val_mean=2.04, n=1),
               D.Entry(label="learned K=1", baseline=None, group="h", rank=2, n_aux=1, val_mean=2.06, n=1)]
    table = D.Table(entries, entries, entries[0], None, "The best learned structure ...")
    df = __import__("pandas").concat([_rows([0]), _rows([1], n_aux=1, group="h")], ignore_index=True)
    annotate_effective(table, df)
    assert (entries[0].eff_n_aux, entries[1].eff_n_aux) == (0, 1)
    sentence = collapse_sentence(table)
    assert sentence.startswith("Training collapsed 1 of the top 2 learned configurations") and "#1 K=3 -> K=0" in sentence
    cells = dict(zip(TABLE_HEADERS, table_cells(entries[0], False)))
    assert (cells["K"], cells["K eff"]) == ("3", "0")
    entries[0].eff_n_aux = 3
    assert collapse_sentence(table) == ""


@pytest.mark.slow
def test_a_search_states_effective_structures_in_status_rows_rebuild_and_report(tmp_path):
    """End to end: a searched structure whose auxiliary is masked off from x (Q none, D diag) next
    to CLD: status, the leaderboard rows, rebuild and the report all say it collapsed."""
    import os
    import subprocess
    import sys

    import pandas as pd
    import yaml

    spec = {"study": "eff", "data": {"name": "digits"}, "model": {"name": "unet", "size": "tiny"},
            "budget": {"steps": 20, "eval_every": 10, "eval_examples": 32, "batch_size": 16, "n_samples": 4,
                       "sample_steps": 5, "test_n_t": 4, "quality": None},
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "structure": {"n_aux": [1], "q_patterns": ["none"], "d_patterns": ["diag"]},
            "baselines": ["cld"], "n_trials": 2, "workers": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "mdmsearch.cli", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    cli("run", "spec.yaml", "--studies-dir", "studies")
    status = cli("status", "eff", "--studies-dir", "studies")
    assert "1 of the 1 learned configuration(s) among the top 2 collapse" in status
    assert "searched K=1 -> effective K=0: K=0 (x alone" in status
    rows = tmp_path / "studies" / "leaderboard" / "dataset=digits" / "study=eff"
    before = pd.read_parquet(rows)[["trial", "eff_n_aux", "eff_structure", "aux_share"]].sort_values("trial")
    assert before["eff_n_aux"].tolist() == [1, 0]  # trial 0: the CLD baseline
    for f in rows.glob("*.parquet"):
        f.unlink()
    cli("rebuild", "eff", "--studies-dir", "studies")
    after = pd.read_parquet(rows)[["trial", "eff_n_aux", "eff_structure", "aux_share"]].sort_values("trial")
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    cli("report", "--root", "studies/leaderboard", "--studies-dir", "studies", "--out", "reports")
    readme = (tmp_path / "reports" / "digits" / "README.md").read_text()
    assert "Training collapsed 1 of the top 1 learned configurations" in readme
    assert "## What training made of the structures" in readme and (tmp_path / "reports" / "digits" / "coupling.png").is_file()
