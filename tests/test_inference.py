"""Evaluation, PF-ODE likelihood and sampling use the weights a run reports as its model (the
EMA of network and process parameters), in the library functions, in the trainer and in the
``evaluate`` and ``sample`` commands; the raw weights are left as they were."""

import copy
import json
import math

import pytest
import torch

from mdmsearch import cli
from mdmsearch.config import parse_run_config
from mdmsearch.objectives import bits_per_dim
from mdmsearch.sampling import ode_log_likelihood, sample
from mdmsearch.training import Trainer, draw_samples, evaluate_bpd, evaluate_model, ode_evaluate, prepare_batch
from mdmsearch.training import artifacts

T_MIN = 1e-3


def _config(steps: int = 2):
    return parse_run_config({
        "process": {"name": "learned", "n_aux": 1},  # learned: the EMA covers Q and D as well
        "data": {"name": "moons", "n_val": 32, "n_test": 32},
        "model": {"size": "tiny"},
        "optim": {"batch_size": 16},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 16, "test_n_t": 1, "n_samples": 0,
                  "sample_steps": 8, "t_min": T_MIN, "progress": False},
    })


@pytest.fixture
def run(tmp_path):
    """A run two steps in, whose EMA weights are clearly not its raw weights."""
    tr = Trainer(_config(), tmp_path)
    for _ in range(2):
        tr.train_step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in tr.ema.shadow:
            s.add_(0.05 * torch.randn(s.shape, generator=g, dtype=s.dtype))
    return tr


def _frozen(tr, weights: str):
    """Copies of the run's process and noise predictor whose live weights are its EMA ("ema")
    or its current ("raw") ones: the reference the functions are checked against."""
    process, net, model = copy.deepcopy((tr.process, tr.net, tr.model))
    if weights == "ema":
        params = list(net.parameters()) + [p for p in process.parameters() if p.requires_grad]
        assert len(params) == len(tr.ema.shadow)
        with torch.no_grad():
            for p, s in zip(params, tr.ema.shadow):
                p.copy_(s)
    net.eval()
    return process, model


def _raw_state(tr) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.ema.params]


def _unchanged(tr, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(tr.ema.params, before))


def _reference_bpd(process, model, data, sampler, n_t, seed, batch_size=256) -> torch.Tensor:
    return evaluate_bpd(process, model, data, None, time_sampler=sampler, n_t=n_t, seed=seed,
                        batch_size=batch_size, return_all=True)["per_example"]


def test_evaluation_uses_the_ema_weights(run):
    before = _raw_state(run)
    res = evaluate_model(run, run.data.val, None, time_sampler=run.eval_sampler, n_t=2, seed=3)
    ema = _reference_bpd(*_frozen(run, "ema"), run.data.val, run.eval_sampler, n_t=2, seed=3)
    raw = _reference_bpd(*_frozen(run, "raw"), run.data.val, run.eval_sampler, n_t=2, seed=3)
    torch.testing.assert_close(res["per_example"], ema, rtol=0, atol=1e-10)
    assert res["bpd"] == pytest.approx(float(ema.mean()), abs=1e-12)
    assert (res["per_example"] - raw).abs().max() > 1e-4  # the check can tell the two apart
    assert _unchanged(run, before)


def test_the_trainer_evaluates_through_it(run):
    """Trainer.evaluate (validation during training, the final metrics, `mdmsearch evaluate`)."""
    tc = run.config.train
    res = run.evaluate("val", n_t=2)
    ema = _reference_bpd(*_frozen(run, "ema"), run.data.val, run.eval_sampler, n_t=2, seed=tc.eval_seed,
                         batch_size=tc.eval_batch_size)
    torch.testing.assert_close(res["per_example"], ema, rtol=0, atol=1e-10)


def _reference_ode_bpd(process, model, data, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x, ldj = prepare_batch(data, None, gen)
    ll = ode_log_likelihood(process, model, x, t_min=T_MIN, generator=gen)
    return bits_per_dim(ll, ldj, int(data[0].numel()), None)


def test_ode_likelihood_uses_the_ema_weights(run):
    before = _raw_state(run)
    data = run.data.val[:8]
    res = ode_evaluate(run, data, None, t_min=T_MIN, seed=5)
    ema = _reference_ode_bpd(*_frozen(run, "ema"), data, seed=5)
    raw = _reference_ode_bpd(*_frozen(run, "raw"), data, seed=5)
    torch.testing.assert_close(res["per_example"], ema, rtol=0, atol=1e-8)
    assert res["n"] == 8 and res["bpd"] == pytest.approx(float(ema.mean()))
    assert res["bpd_se"] == pytest.approx(float(ema.std()) / math.sqrt(7))
    assert (res["per_example"] - raw).abs().max() > 1e-4
    assert _unchanged(run, before)


def _reference_samples(process, model, n, seed, steps=8, sampler="em") -> torch.Tensor:
    return sample(process, model, n, (2,), sampler=sampler, steps=steps, t_min=T_MIN,
                  generator=torch.Generator().manual_seed(seed))


def test_sampling_uses_the_ema_weights(run):
    before = _raw_state(run)
    x = draw_samples(run, 16, (2,), sampler="em", steps=8, t_min=T_MIN, seed=4)
    ema = _reference_samples(*_frozen(run, "ema"), 16, seed=4)
    raw = _reference_samples(*_frozen(run, "raw"), 16, seed=4)
    torch.testing.assert_close(x, ema, rtol=0, atol=1e-6)
    assert (x - raw).abs().max() > 1e-4
    assert _unchanged(run, before)


def test_the_trainer_samples_through_it(run, monkeypatch):
    """samples.png at the end of a run: the EMA model's samples (eval seed, sample_steps)."""
    seen = []
    monkeypatch.setattr(artifacts, "save_sample_figure", lambda x, levels, path, **kw: seen.append(x) or path)
    assert run.write_samples(16) == "samples.png"
    ema = _reference_samples(*_frozen(run, "ema"), 16, seed=run.config.train.eval_seed)
    torch.testing.assert_close(seen[0], ema, rtol=0, atol=1e-6)


@pytest.fixture
def trained(tmp_path):
    """A finished two-step run on disk, and its trainer (EMA != raw after two warm-up steps)."""
    out = tmp_path / "run"
    tr = Trainer(_config(), out)
    tr.fit()
    assert any(not torch.equal(p, s) for p, s in zip(tr.ema.params, tr.ema.shadow))
    return out, tr



def test_the_evaluate_command_reports_the_ema_model(trained, capsys, restore_logging):
    out, tr = trained
    assert cli.main(["evaluate", str(out), "--split", "val", "--n", "8", "--n-t", "1", "--ode", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    ema = _reference_ode_bpd(*_frozen(tr, "ema"), tr.data.val[:8], seed=tr.config.train.eval_seed)
    elbo = _reference_bpd(*_frozen(tr, "ema"), tr.data.val[:8], tr.eval_sampler, n_t=1,
                          seed=tr.config.train.eval_seed)
    assert res["val_ode_bpd"] == pytest.approx(float(ema.mean()), abs=1e-8) and res["ode_n"] == 8
    assert res["val_bpd"] == pytest.approx(float(elbo.mean()), abs=1e-10)


@pytest.mark.parametrize("sampler", ["em", "ode"])
def test_the_sample_command_draws_from_the_ema_model(trained, sampler, capsys, monkeypatch, tmp_path,
                                                     restore_logging):
    import mdmsearch.sampling

    out, tr = trained
    seen = []
    real = mdmsearch.sampling.save_sample_figure
    monkeypatch.setattr(mdmsearch.sampling, "save_sample_figure",
                        lambda x, levels, path, **kw: seen.append(x) or real(x, levels, path, **kw))
    png = tmp_path / "s.png"
    argv = ["sample", str(out), "--n", "8", "--steps", "6", "--sampler", sampler, "--seed", "2", "--out", str(png), "-q"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    ema = _reference_samples(*_frozen(tr, "ema"), 8, seed=2, steps=6, sampler=sampler)
    torch.testing.assert_close(seen[0], ema, rtol=0, atol=1e-6)
