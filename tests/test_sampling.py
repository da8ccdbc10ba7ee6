"""Sampling and exact likelihood: checked against the analytic Gaussian oracle."""

import math

import pytest
import torch

from mdmsearch.diffusion import apply_matrix, learned, preset
from mdmsearch.objectives import GaussianOracle, dequantize, gaussian_log_prob, logit_transform
from mdmsearch.sampling import (
    SAMPLERS,
    ode_log_likelihood,
    register_sampler,
    sample,
    save_sample_figure,
    save_samples,
    score_fn,
    time_grid,
    to_images,
    to_pixels,
)
from mdmsearch.sampling import likelihood as likelihood_mod

DT = torch.float64
MU, VAR = 0.1, 0.25
D = 2  # data dimension of the Gaussian tests
N_SAMPLES = 4000
SE_MEAN = math.sqrt(VAR / (N_SAMPLES * D))  # standard error of the pooled sample mean
SE_VAR = VAR * math.sqrt(2.0 / (N_SAMPLES * D))  # ... and of the sample variance
X_EVAL = torch.tensor([[0.3, -0.2], [0.5, 0.0], [-0.4, 0.8]], dtype=DT)


class BatchOracle:
    """GaussianOracle evaluated once per time (samplers pass equal times), then applied to
    the whole batch: the same score, without B identical kernel computations per step."""

    def __init__(self, process, mu=MU, var=VAR):
        self.oracle = GaussianOracle(process, mu, var)

    def __call__(self, z, t):
        t = t.to(DT).reshape(-1)
        assert bool((t == t[0]).all())
        mean, cov = self.oracle.moments(t[:1])  # [1, n], [1, n, n]
        centred = z - mean[0].to(z.dtype).reshape(1, -1, *([1] * (z.dim() - 2)))
        return -apply_matrix(torch.linalg.inv(cov[0]), centred)


class EpsOracle:
    """The oracle as a noise-prediction model: eps_hat = -L_t^T s (L_t given x)."""

    def __init__(self, process, score):
        self.process, self.score = process, score

    def __call__(self, z, t):
        chol = self.process.kernel(t.to(DT).reshape(-1)[:1], given="x").chol[0]  # [n, n]
        return -apply_matrix(chol.T, self.score(z, t))


def _processes():
    return {"vpsde": preset("vpsde"), "cld": preset("cld"), "learned2": learned(2, init_noise=0.5, seed=2)}


# ---------------------------------------------------------------------- time grids
@pytest.mark.parametrize("kind", ["uniform", "quadratic", "log"])
def test_time_grid_decreasing_from_T_to_t_min(kind):
    ts = time_grid(50, 1e-3, 1.0, kind)
    assert ts.dtype == DT and ts.shape == (51,)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 1e-3
    assert bool((ts[1:] < ts[:-1]).all())


def test_time_grids_differ_and_bad_inputs_raise():
    uni, quad, log = (time_grid(10, 1e-3, 1.0, k) for k in ("uniform", "quadratic", "log"))
    # quadratic and log grids put more points near t_min than the uniform one
    assert float(quad[-2]) < float(uni[-2]) and float(log[-2]) < float(quad[-2])
    with pytest.raises(ValueError, match="uniform"):
        time_grid(10, kind="cubic")
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(ValueError):
        time_grid(10, t_min=0.0)


def test_unknown_sampler_names_options():
    proc = preset("vpsde")
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'.*'em'.*'ode'"):
        sample(proc, BatchOracle(proc), 4, (2,), sampler="heun", parameterization="score")
    with pytest.raises(ValueError, match="parameterization"):
        score_fn(proc, BatchOracle(proc), "v")


def test_register_sampler_is_used_by_sample():
    calls = []

    @register_sampler("_identity_test")
    def identity(process, score, z, ts, *, generator=None, callback=None):
        calls.append((z.shape, ts.shape))
        return z

    try:
        proc = preset("cld")
        z = sample(proc, BatchOracle(proc), 3, (2,), sampler="_identity_test", steps=7, parameterization="score", return_all=True)
        assert calls == [(torch.Size([3, 2, 2]), torch.Size([8]))] and z.shape == (3, 2, 2)
    finally:
        SAMPLERS.pop("_identity_test")


# ---------------------------------------------------------------------- sampling the oracle
@pytest.mark.parametrize("name", ["vpsde", "cld", "learned2"])
@pytest.mark.parametrize("sampler,steps,opts", [("em", 500, {}), ("ode", 100, {})])
def test_samples_match_gaussian_moments(name, sampler, steps, opts):
    proc = _processes()[name]
    gen = torch.Generator().manual_seed(7)
    x = sample(proc, BatchOracle(proc), N_SAMPLES, (D,), sampler=sampler, steps=steps, t_min=1e-3,
               parameterization="score", generator=gen, dtype=DT, **opts)
    assert x.shape == (N_SAMPLES, D) and bool(torch.isfinite(x).all())
    mean_err, var_err = float(x.mean()) - MU, float(x.var()) - VAR
    assert abs(mean_err) < 4 * SE_MEAN, (name, sampler, mean_err)
    assert abs(var_err) < 4 * SE_VAR, (name, sampler, var_err)


def test_ode_adaptive_method_matches_moments():
    proc = preset("cld")
    x = sample(proc, BatchOracle(proc), N_SAMPLES, (D,), sampler="ode", steps=4, method="dopri5", rtol=1e-6,
               atol=1e-6, parameterization="score", generator=torch.Generator().manual_seed(3), dtype=DT)
    assert abs(float(x.mean()) - MU) < 4 * SE_MEAN and abs(float(x.var()) - VAR) < 4 * SE_VAR


@pytest.mark.parametrize("sampler", ["em", "ode"])
@pytest.mark.parametrize("name", ["cld", "learned2"])
def test_eps_model_gives_same_samples_as_score(name, sampler):
    proc = _processes()[name]
    oracle = BatchOracle(proc)
    kw = dict(sampler=sampler, steps=40, grid="quadratic", dtype=DT, return_all=True)
    z_score = sample(proc, oracle, 300, (D,), parameterization="score", generator=torch.Generator().manual_seed(5), **kw)
    z_eps = sample(proc, EpsOracle(proc, oracle), 300, (D,), parameterization="eps", generator=torch.Generator().manual_seed(5), **kw)
    assert z_score.shape == (300, proc.n, D)
    torch.testing.assert_close(z_eps, z_score, rtol=1e-8, atol=1e-8)
    # ... and a wrong conversion (forgetting the transpose) would not
    wrong = lambda z, t: -apply_matrix(proc.kernel(t.to(DT)[:1]).chol[0], oracle(z, t))
    z_wrong = sample(proc, wrong, 300, (D,), parameterization="eps", generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.allclose(z_wrong, z_score, atol=1e-3)


def test_em_last_step_is_noise_free_and_callback_sees_every_step():
    proc = preset("vpsde")
    seen = []
    kw = dict(sampler="em", steps=5, parameterization="score", dtype=DT)
    a = sample(proc, BatchOracle(proc), 10, (D,), generator=torch.Generator().manual_seed(1),
               callback=lambda i, t, z: seen.append(float(t)), **kw)
    b = sample(proc, BatchOracle(proc), 10, (D,), generator=torch.Generator().manual_seed(1), final_noise=True, **kw)
    assert seen == pytest.approx(time_grid(5, 1e-3, 1.0)[1:].tolist())
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------- exact likelihood
def _vpsde_flow_log_prob(proc, x, t_min):
    """Exact value of the ODE likelihood for the VPSDE oracle: the 1-D flow from q_{t_min}
    to q_T is the affine map z_T = m_T + sqrt(C_T / C_0)(x - m_0), so
    log p(x) = log pi(z_T) + 1/2 log(C_T / C_0) d."""
    oracle = GaussianOracle(proc, MU, VAR)
    m0, c0 = oracle.moments(torch.tensor([t_min], dtype=DT))
    m1, c1 = oracle.moments(torch.tensor([proc.T], dtype=DT))
    m0, c0, m1, c1 = float(m0[0, 0]), float(c0[0, 0, 0]), float(m1[0, 0]), float(c1[0, 0, 0])
    z_end = m1 + math.sqrt(c1 / c0) * (x - m0)
    log_pi = (-0.5 * (math.log(2 * math.pi) + z_end**2)).sum(dim=1)
    return log_pi + 0.5 * math.log(c1 / c0) * x.shape[1]


def test_ode_likelihood_vpsde_matches_exact_density():
    proc = preset("vpsde")
    ll = ode_log_likelihood(proc, BatchOracle(proc), X_EVAL, parameterization="score", t_min=1e-5, rtol=1e-7, atol=1e-7)
    assert ll.dtype == DT and ll.shape == (3,)
    exact = gaussian_log_prob(X_EVAL, MU, VAR)
    # within 1e-2 nats per dimension of log N(x; mu, var) (the prior mismatch is small) ...
    assert float((ll - exact).abs().max()) < 1e-2 * D, (ll - exact)
    # ... and to ODE accuracy of the flow's exact value, prior mismatch included
    torch.testing.assert_close(ll, _vpsde_flow_log_prob(proc, X_EVAL, 1e-5), rtol=0, atol=1e-4)


def test_ode_likelihood_eps_parameterization_agrees():
    proc = preset("cld")
    oracle = BatchOracle(proc)
    kw = dict(t_min=1e-3, rtol=1e-7, atol=1e-7)
    a = ode_log_likelihood(proc, oracle, X_EVAL, parameterization="score", generator=torch.Generator().manual_seed(2), **kw)
    b = ode_log_likelihood(proc, EpsOracle(proc, oracle), X_EVAL, parameterization="eps", generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ode_likelihood_cld_bound_is_tight_for_oracle():
    """E_v0[log p(x, v0) - log q(v0|x)] <= log N(x) + tol and close to it (default beta_1 = 10);
    with the prior mismatch removed (beta_1 = 20) it equals log N(x) for every v0 draw."""
    exact = gaussian_log_prob(X_EVAL, MU, VAR)
    proc = preset("cld")
    draws = torch.stack([
        ode_log_likelihood(proc, BatchOracle(proc), X_EVAL, parameterization="score", t_min=1e-5,
                           generator=torch.Generator().manual_seed(s))
        for s in range(4)
    ])  # [4, B]
    gap = draws.mean(0) - exact
    assert float(gap.max()) < 5e-3 and float(gap.abs().max()) < 3e-2, gap
    assert float(draws.std(0).max()) > 0  # v0 is really drawn
    proc20 = preset("cld", beta_1=20.0)
    ll = ode_log_likelihood(proc20, BatchOracle(proc20), X_EVAL, parameterization="score", t_min=1e-5,
                            rtol=1e-7, atol=1e-7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ll, exact, rtol=0, atol=2e-3)


def test_ode_likelihood_learned_process_is_tight_with_small_prior_gap():
    # the pointwise prior mismatch log pi(z_T) - log q_T(z_T) is first order in the gap
    # (~3e-3 nats at beta_1 = 20 for this slowly mixing process), so use beta_1 = 30
    proc = learned(2, init_noise=0.5, seed=2, beta_1=30.0)
    ll = ode_log_likelihood(proc, BatchOracle(proc), X_EVAL, parameterization="score", t_min=1e-5,
                            rtol=1e-6, atol=1e-6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ll, gaussian_log_prob(X_EVAL, MU, VAR), rtol=0, atol=2e-3)


def test_hutchinson_agrees_with_exact_trace_in_expectation():
    proc = preset("cld")
    oracle = BatchOracle(proc)
    diffs = []
    for seed in range(4):  # same seed -> same v0 (drawn before the probes)
        kw = dict(parameterization="score", t_min=1e-3)
        exact = ode_log_likelihood(proc, oracle, X_EVAL, exact_trace=True, generator=torch.Generator().manual_seed(seed), **kw)
        hutch = ode_log_likelihood(proc, oracle, X_EVAL, exact_trace=False, n_probes=16,
                                   generator=torch.Generator().manual_seed(seed), **kw)
        diffs.append(hutch - exact)
    diffs = torch.cat(diffs)  # [4 * B]
    se = float(diffs.std()) / math.sqrt(diffs.numel())
    assert float(diffs.std()) > 1e-3  # the probes really are random
    assert abs(float(diffs.mean())) < 4 * se + 1e-4, (float(diffs.mean()), se)


def test_hutchinson_is_exact_for_a_diagonal_jacobian():
    """VPSDE oracle: the score Jacobian is diagonal, so Rademacher probes (e_i^2 = 1) give
    the exact trace for every draw; any other probe law would not."""
    proc = preset("vpsde")
    kw = dict(parameterization="score", t_min=1e-3, rtol=1e-7, atol=1e-7)
    exact = ode_log_likelihood(proc, BatchOracle(proc), X_EVAL, exact_trace=True, **kw)
    hutch = ode_log_likelihood(proc, BatchOracle(proc), X_EVAL, exact_trace=False, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(hutch, exact, rtol=0, atol=1e-6)


def test_divergence_estimators_on_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    mat = torch.randn(6, 6, generator=gen, dtype=DT)
    z = torch.randn(3, 2, 3, generator=gen, dtype=DT).requires_grad_(True)  # [B, n, d], n d = 6
    out = (z.reshape(3, 6) @ mat.T).reshape(3, 2, 3)
    trace = torch.trace(mat).expand(3)
    torch.testing.assert_close(likelihood_mod.divergence_exact(out, z), trace)
    probes = torch.randint(0, 2, (4000, 3, 2, 3), generator=gen).to(DT) * 2 - 1
    est = likelihood_mod.divergence_hutchinson(out, z, probes)
    off = mat - torch.diag(torch.diagonal(mat))
    se = float(torch.sqrt(((off + off.T) ** 2).sum() / 2 / 4000))  # sd of e^T M e is sqrt(sum_{i<j} (M_ij + M_ji)^2)
    assert float((est - trace).abs().max()) < 4 * se


def test_ode_likelihood_of_a_constant_model_is_the_linear_flow():
    """A zero eps model (not even a function of z) leaves only the drift: z_T = e^{-dB/2} x and
    log p(x) = log N(z_T; 0, 1) - dB d / 2, with dB = B(T) - B(t_min) (VPSDE, tr A = -1/2)."""
    proc = preset("vpsde")
    zero = lambda z, t: torch.zeros_like(z)
    for exact_trace in (True, False):
        ll = ode_log_likelihood(proc, zero, X_EVAL, t_min=1e-3, rtol=1e-8, atol=1e-8, exact_trace=exact_trace,
                                generator=torch.Generator().manual_seed(0))
        big_b = proc.schedule.integral(torch.tensor([1.0, 1e-3], dtype=DT))
        d_b = float(big_b[0] - big_b[1])
        expected = gaussian_log_prob(X_EVAL * math.exp(-d_b / 2), 0.0, 1.0) - 0.5 * d_b * D
        torch.testing.assert_close(ll, expected, rtol=0, atol=1e-6)


def test_trace_choice_follows_dimension(monkeypatch):
    calls = {"exact": 0, "hutch": 0}
    real_exact, real_hutch = likelihood_mod.divergence_exact, likelihood_mod.divergence_hutchinson

    def count(key, fn):
        def wrapped(*args):
            calls[key] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(likelihood_mod, "divergence_exact", count("exact", real_exact))
    monkeypatch.setattr(likelihood_mod, "divergence_hutchinson", count("hutch", real_hutch))
    proc = preset("cld")
    kw = dict(parameterization="score", method="rk4", generator=torch.Generator().manual_seed(0))
    ode_log_likelihood(proc, BatchOracle(proc), torch.zeros(2, 32, dtype=DT), **kw)  # n d = 64: exact
    assert calls["exact"] > 0 and calls["hutch"] == 0
    ode_log_likelihood(proc, BatchOracle(proc), torch.zeros(2, 33, dtype=DT), **kw)  # n d = 66: Hutchinson
    assert calls["hutch"] > 0


# ---------------------------------------------------------------------- images
def test_to_images_inverts_preprocessing(tmp_path):
    gen = torch.Generator().manual_seed(0)
    levels = 17
    pixels = torch.randint(0, levels, (4, 1, 8, 8), generator=gen)
    y, _ = logit_transform(dequantize(pixels, levels, generator=gen))
    assert torch.equal(to_pixels(y, levels), pixels)
    img = to_images(y, levels)
    assert img.dtype == torch.float32 and float(img.min()) >= 0 and float(img.max()) <= 1
    torch.testing.assert_close(img, pixels.float() / (levels - 1))
    assert save_samples(img, tmp_path / "grid.png").stat().st_size > 0
    assert save_samples(torch.randn(50, 2), tmp_path / "pts.png").stat().st_size > 0
    with pytest.raises(ValueError):
        save_samples(torch.randn(5, 3), tmp_path / "bad.png")


def test_sample_figures_of_model_space_samples(tmp_path):
    """Images (levels set) as a grid, 2-D points as a scatter; other vectors only with
    first_two (the sample command), as their first two coordinates; else nothing is written."""
    y, _ = logit_transform(dequantize(torch.randint(0, 17, (4, 1, 8, 8)), 17))
    assert save_sample_figure(y, 17, tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert save_sample_figure(torch.randn(20, 2), None, tmp_path / "pts.png").name == "pts.png"
    assert save_sample_figure(torch.randn(20, 3), None, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert save_sample_figure(torch.randn(20, 3), None, tmp_path / "two.png", first_two=True).exists()
