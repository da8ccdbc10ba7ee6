"""The Gaussian-residual ("mixed") parameterization: eps_hat = eps_G + net.

With a zero network the model *is* the exact score of Gaussian data, so every identity of the
Gaussian oracle must hold for it; the Rao-Blackwellized DSM term must equal the plain one in
expectation; gradients must reach Q and D through eps_G; statistics travel with checkpoints.
"""

import math

import pytest
import torch

from mdmsearch.config import parse_run_config
from mdmsearch.data import load_dataset
from mdmsearch.diffusion import learned, preset
from mdmsearch.diffusion.ops import apply_matrix
from mdmsearch.errors import ConfigError
from mdmsearch.objectives import (
    GaussianOracle,
    GaussianStats,
    ResidualEps,
    elbo,
    gaussian_log_prob,
    gaussian_prior_gap,
    gaussian_part,
    make_time_sampler,
    residual_stats,
)
from mdmsearch.objectives.elbo import diffusion_term_dsm
from mdmsearch.objectives.residual import gaussian_direction, gaussian_dsm_expectation, gaussian_error
from mdmsearch.sampling import score_fn
from mdmsearch.training import Trainer
from mdmsearch.training.evaluate import data_moments, evaluate_bpd, prepare_batch

DT = torch.float64
MU, VAR = 0.1, 0.25


class Zero(torch.nn.Module):
    """A residual network that outputs nothing: eps_hat = eps_G."""

    def forward(self, z, t):
        return torch.zeros_like(z)


def _stats(shape, mu=MU, var=VAR):
    return GaussianStats(torch.full(shape, mu, dtype=DT), torch.full(shape, var, dtype=DT))


def _processes():
    return {"vpsde": preset("vpsde"), "cld": preset("cld"), "malda": preset("malda"),
            "learned3": learned(3, init_noise=0.5, seed=3)}


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda", "learned3"])
def test_zero_residual_is_the_exact_gaussian_score(name):
    """Sherman-Morrison per coordinate = the oracle's -C^{-1}(z - Phi m_bar), to float64 precision."""
    proc = _processes()[name]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, proc.n, 3, generator=gen, dtype=DT)
    model = ResidualEps(Zero(), _stats((3,)))
    oracle = GaussianOracle(proc, MU, VAR)
    # from z alone (samplers): Sherman-Morrison cancels where Sigma is nearly singular (CLD's
    # x-variance given x is O(B^3) at small t), so the tolerance follows the conditioning
    for t, rtol in ((1e-3, 1e-3), (0.01, 1e-6), (0.05, 1e-8), (0.5, 1e-8), (1.0, 1e-8)):
        tt = torch.full((5,), t, dtype=DT)
        got = score_fn(proc, model)(z, tt)
        torch.testing.assert_close(got, oracle(z, tt), rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda", "learned3"])
def test_gaussian_error_from_x_and_eps_is_exact_at_small_t(name):
    """eps_G - eps from (x, eps), as the ELBO computes it, vs the oracle's eps prediction
    L^T C^{-1}(z - Phi m_bar) minus eps, formed with the well-conditioned C."""
    proc = _processes()[name].requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    eps = torch.randn(4, proc.n, 3, generator=gen, dtype=DT)
    stats = _stats((3,))
    oracle = GaussianOracle(proc, MU, VAR)
    for t in (1e-3, 0.02, 0.6):
        tt = torch.full((4,), t, dtype=DT)
        kern = proc.kernel(tt)
        z, _, _ = proc.perturb(x, tt, eps=eps)
        mean, cov = oracle.moments(tt)
        resid = torch.linalg.solve(cov, (z - mean[..., None]))  # C^{-1}(z - Phi m_bar), [B, n, 3]
        want = kern.chol.transpose(-1, -2) @ resid - eps
        q, a = gaussian_direction(kern.phi, kern.chol, 4)
        torch.testing.assert_close(gaussian_error(stats, x, eps, q, a), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda", "learned3"])
def test_zero_residual_elbo_matches_gaussian_oracle(name):
    """Monte Carlo ELBO with eps_G alone = log N(x; mu, s2) - prior gap, within 4 SE, with and
    without the Rao-Blackwellized DSM term."""
    proc = _processes()[name].requires_grad_(False)
    gen = torch.Generator().manual_seed(11)
    n_ex, d = 4000, 8
    x = MU + math.sqrt(VAR) * torch.randn(n_ex, d, generator=gen, dtype=DT)
    expected = (gaussian_log_prob(x, MU, VAR) - gaussian_prior_gap(proc, x, MU, VAR)) / d
    model = ResidualEps(Zero(), _stats((d,)))
    for rb in (True, False):
        diff = elbo(proc, x, model, n_t=4, generator=gen, rao_blackwell=rb) / d - expected
        se = float(diff.std()) / math.sqrt(n_ex)
        assert abs(float(diff.mean())) < 4 * se, (rb, float(diff.mean()), se)
        assert se < (0.03 if rb else 0.1), (rb, se)


def test_rao_blackwell_expectation_matches_monte_carlo():
    """E_eps |R(eps_G - eps)|^2 in closed form vs the average over 200k draws of eps."""
    proc = learned(2, init_noise=0.5, seed=5).requires_grad_(False)
    stats = GaussianStats(torch.tensor([0.3, -1.0], dtype=DT), torch.tensor([0.5, 0.05], dtype=DT))
    x = torch.tensor([[0.9, -0.7]], dtype=DT)
    t = torch.tensor([0.07], dtype=DT)
    kern = proc.kernel(t)
    inv_lt = torch.linalg.inv(kern.chol[0]).T
    r = torch.sqrt(2.0 * kern.beta)[:, None, None] * (proc.D_factor.T @ inv_lt)  # [1, n, n]
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    xs = x.expand(n, -1)
    eps = torch.randn(n, proc.n, 2, generator=gen, dtype=DT)
    z, _, _ = proc.perturb(xs, t.expand(n), eps=eps)
    part = gaussian_part(stats, z, kern.phi, kern.chol)
    sq = apply_matrix(r[0], part.eps - eps).pow(2).sum(dim=(1, 2))
    closed = gaussian_dsm_expectation(stats, x, part.q[:1], part.a[:1], r)
    se = float(sq.std()) / math.sqrt(n)
    assert abs(float(sq.mean()) - float(closed[0])) < 4 * se, (float(sq.mean()), float(closed[0]), se)


def test_rao_blackwell_is_unbiased_with_a_nonzero_residual():
    """With a residual that depends on z, both estimators of the diffusion term agree in mean."""

    class Lin(torch.nn.Module):
        def forward(self, z, t):
            return 0.3 * torch.tanh(z) * t.reshape(-1, *([1] * (z.dim() - 1)))

    proc = preset("cld")
    model = ResidualEps(Lin(), _stats((4,), 0.0, 0.4))
    gen = torch.Generator().manual_seed(4)
    x = 0.6 * torch.randn(20000, 4, generator=gen, dtype=DT)
    t = torch.full((20000,), 0.2, dtype=DT)
    w = torch.ones(20000, dtype=DT)
    a = diffusion_term_dsm(proc, x, model, t, w, generator=gen, rao_blackwell=True).detach()
    b = diffusion_term_dsm(proc, x, model, t, w, generator=gen, rao_blackwell=False).detach()
    se = math.hypot(float(a.std()), float(b.std())) / math.sqrt(20000)
    assert abs(float(a.mean() - b.mean())) < 4 * se
    assert float(a.var()) < 0.5 * float(b.var())  # the closed-form part removes most of the noise


def test_gradients_reach_q_and_d_through_eps_g():
    """d ELBO / d (U, L) by autograd = central finite differences, with the residual net zero and
    the plain DSM term (eps_G is then the only path from Q, D into the squared error)."""
    proc = learned(2, init_noise=0.3, seed=1)
    model = ResidualEps(Zero(), _stats((3,)))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    sampler = make_time_sampler("vp", proc, t_min=1e-2)

    def value():
        gen = torch.Generator().manual_seed(9)
        return elbo(proc, x, model, time_sampler=sampler, generator=gen, truncation=False, rao_blackwell=False).mean()

    params = [p for p in proc.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value(), params)
    checked = 0
    with torch.no_grad():
        for p, g in zip(params, grads):
            for idx in [i for i in range(p.numel()) if abs(float(g.flatten()[i])) > 0][:3]:
                h = 1e-6
                p.view(-1)[idx] += h
                up = float(value())
                p.view(-1)[idx] -= 2 * h
                down = float(value())
                p.view(-1)[idx] += h
                fd = (up - down) / (2 * h)
                assert abs(fd - float(g.flatten()[idx])) < 1e-5 * max(1.0, abs(fd)), (p.shape, idx, fd, g)
                checked += 1
    assert checked >= 4 and all(float(g.abs().sum()) > 0 for g in grads)


def test_stats_choices():
    mean = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    var = torch.tensor([1e-6, 1.0, 4.0], dtype=DT)
    m, v = residual_stats(mean, var, "pixel")
    assert torch.equal(m, mean) and torch.equal(v, var)
    g_var = float(var.mean() + (mean - 1.0).pow(2).mean())  # pooled: within + between coordinates
    m, v = residual_stats(mean, var, "global")
    assert torch.allclose(m, torch.ones(3, dtype=DT)) and torch.allclose(v, torch.full((3,), g_var, dtype=DT))
    m, v = residual_stats(mean, var, "floored")
    assert float(v[0]) == pytest.approx(0.1 * g_var) and float(v[2]) == 4.0
    with pytest.raises(ValueError):
        residual_stats(mean, var, "median")


def test_digits_zero_residual_bpd_is_the_gaussian_bpd():
    """Through the real prepare_batch -> evaluate_bpd path: a zero residual network on digits gives
    the closed-form BPD of the per-coordinate Gaussian model in logit space (ldj included), up to
    the prior gap and the truncation at t_min."""
    data = load_dataset("digits", seed=0)
    gen = torch.Generator().manual_seed(3)
    stats = GaussianStats(*residual_stats(*data_moments(data.train, data.levels, gen), "global"))
    proc = preset("vpsde")
    model = ResidualEps(Zero(), stats)
    val = data.val[:128]
    sampler = make_time_sampler("vp", proc, t_min=1e-3)
    res = evaluate_bpd(proc, model, val, data.levels, time_sampler=sampler, n_t=16, seed=7, return_all=True)
    # the same dequantization noise as evaluate_bpd (its first generator is seeded with `seed`)
    y, ldj = prepare_batch(val, data.levels, torch.Generator().manual_seed(7))
    y = y.to(DT)
    mu, var = float(stats.mean.flatten()[0]), float(stats.var.flatten()[0])
    log_n = gaussian_log_prob(y, mu, var) - gaussian_prior_gap(proc, y, mu, var)
    dim = data.dim
    exact = -(log_n + ldj) / (dim * math.log(2)) + math.log2(data.levels)
    diff = res["per_example"] - exact
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert abs(float(diff.mean())) < 4 * se + 2e-3, (float(diff.mean()), se)
    assert se < 5e-3
    # dropping the ldj or the level count would move it by far more than that
    assert abs(float(ldj.mean()) / (dim * math.log(2))) > 0.5


def _tiny_config(parameterization, **train):
    return parse_run_config({
        "process": {"name": "cld"}, "data": {"name": "gaussian", "options": {"dim": 2}},
        "model": {"name": "mlp", "size": "tiny", "parameterization": parameterization},
        "train": {"steps": 2, "eval_every": 2, "eval_examples": 32, "n_samples": 0, "progress": False,
                  "eval_n_t": 1, "test_n_t": 1, "device": "cpu", **train}})


def test_checkpoint_keeps_stats_and_refuses_the_other_parameterization(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_tiny_config("mixed"), out)
    trainer.fit()
    assert (out / "residual_stats.json").is_file() and (out / "per_example.parquet").is_file()
    saved_mean = trainer.residual.mean.clone()
    # a resumed run uses the statistics it was trained with, not new ones
    again = Trainer(_tiny_config("mixed", steps=3), out)
    again.residual.mean.add_(1.0)
    assert again.try_resume()
    torch.testing.assert_close(again.residual.mean, saved_mean)
    # the other parameterization refuses the checkpoint with a message that names it
    other = Trainer(_tiny_config("eps"), out)
    with pytest.raises(ConfigError, match="parameterization"):
        other.try_resume()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    with pytest.raises(ConfigError, match="parameterization"):
        other.load_state_dict(state)


@pytest.mark.parametrize("process, want", [("vpsde", "eps"), ("cld", "mixed")])
def test_auto_parameterization_is_mixed_only_with_auxiliaries(process, want, tmp_path):
    cfg = _tiny_config("auto")
    cfg.process.name = process
    trainer = Trainer(cfg, tmp_path / process)
    assert trainer.parameterization == want
    assert isinstance(trainer.model, ResidualEps) == (want == "mixed")
    assert trainer.state_dict()["parameterization"] == want
