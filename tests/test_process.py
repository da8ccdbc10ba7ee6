"""Forward process: exact kernels vs ODE integration, invariants, validity, shapes."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from mdmsearch.diffusion import (
    apply_matrix,
    check_matrices,
    check_structure,
    d_pattern,
    expm,
    learned,
    preset,
    q_pattern,
)
from mdmsearch.errors import CholeskyError, InvalidStructureError

DT = torch.float64
PRESETS = ["vpsde", "cld", "alda", "malda"]


def _processes():
    procs = [(name, preset(name)) for name in PRESETS]
    for k in (1, 2, 3):
        procs.append((f"learned{k}", learned(k, init_noise=0.7, seed=k)))
    procs.append(("learned2-diag", learned(2, d_param="diag", init_noise=0.5, seed=7)))
    return procs


def _ode_kernel(proc, t_end, s0):
    """Integrate dPhi = beta A Phi, dSigma = beta (A Sigma + Sigma A^T + 2D) in float64."""
    n = proc.n
    a = proc.A.detach().numpy()
    d = proc.D.detach().numpy()

    def rhs(t, y):
        beta = float(proc.schedule.beta(torch.tensor(t, dtype=DT)))
        phi = y[: n * n].reshape(n, n)
        sig = y[n * n :].reshape(n, n)
        return np.concatenate([(beta * a @ phi).ravel(), (beta * (a @ sig + sig @ a.T + 2 * d)).ravel()])

    y0 = np.concatenate([np.eye(n).ravel(), s0.numpy().ravel()])
    sol = solve_ivp(rhs, (0.0, t_end), y0, method="DOP853", rtol=1e-13, atol=1e-15)
    y = sol.y[:, -1]
    return y[: n * n].reshape(n, n), y[n * n :].reshape(n, n)


@pytest.mark.parametrize("name,proc", _processes(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("given", ["x", "xv"])
def test_transition_matches_ode(name, proc, given):
    ts = [1e-3, 0.05, 0.3, 1.0]
    if given == "x":
        ts = [1e-3, 0.05, 0.3, 1.0, 2.5, 4.0]  # B(4) ~ 79: large-B precision too
    phi, sigma = proc.transition(torch.tensor(ts, dtype=DT), given=given)
    assert phi.shape == (len(ts), proc.n, proc.n) and sigma.dtype == DT
    for i, t in enumerate(ts):
        phi_ref, sig_ref = _ode_kernel(proc, t, proc.initial_cov(given))
        np.testing.assert_allclose(phi[i].detach().numpy(), phi_ref, atol=1e-8, rtol=0)
        np.testing.assert_allclose(sigma[i].detach().numpy(), sig_ref, atol=1e-8, rtol=0)


def test_expm_matches_scipy_and_keeps_tiny_entries():
    from scipy.linalg import expm as sexpm

    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 0.3, 3.0, 40.0):
        x = scale * torch.randn(5, 6, 6, generator=g, dtype=DT)
        ref = np.stack([sexpm(m) for m in x.numpy()])
        np.testing.assert_allclose(expm(x).numpy(), ref, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(ref).max()))
    # ALDA given (x, v0): the x-variance is O(B^5); its relative precision must survive
    sig = preset("alda").transition(torch.tensor([1e-3], dtype=DT), given="xv")[1][0]
    _, sig_ref = _ode_kernel(preset("alda"), 1e-3, torch.zeros(3, 3, dtype=DT))
    assert sig[0, 0] > 0
    assert abs(float(sig[0, 0]) / sig_ref[0, 0] - 1) < 1e-6
    # ... also when the batch holds large times (one squaring count for the whole batch)
    batched = preset("alda").transition(torch.tensor([1e-3, 1.0, 4.0], dtype=DT), given="xv")[1][0]
    assert abs(float(batched[0, 0]) / float(sig[0, 0]) - 1) < 1e-10


def test_kernel_gradients_match_finite_differences():
    """The hand-written backward of the doublings and the shared-power Taylor core give the
    gradient of what the forward computes, in A and D (and in B through plain autograd)."""
    from mdmsearch.diffusion.ops import _Doublings, phi_and_noise_cov

    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 4):
        a = (0.7 * torch.randn(n, n, generator=g, dtype=DT) - torch.eye(n, dtype=DT)).requires_grad_()
        f = torch.randn(n, n, generator=g, dtype=DT)
        d = (f @ f.T).requires_grad_()
        big_b = torch.tensor([1e-4, 0.3, 2.0, 10.0], dtype=DT, requires_grad=True)  # 0 to 5 doublings
        assert torch.autograd.gradcheck(phi_and_noise_cov, (a, d, big_b))
        phi = torch.randn(2, n, n, generator=g, dtype=DT, requires_grad=True)
        sym = torch.randn(2, n, n, generator=g, dtype=DT)
        s = (sym + sym.transpose(-1, -2)).requires_grad_()
        assert torch.autograd.gradcheck(lambda p, q: _Doublings.apply(p, q, 3), (phi, s))


def test_vpsde_closed_form():
    proc = preset("vpsde")
    t = torch.linspace(1e-4, 1.0, 50, dtype=DT)
    phi, sig = proc.transition(t)
    big_b = 0.1 * t + 0.5 * (10 - 0.1) * t**2
    torch.testing.assert_close(phi[:, 0, 0], torch.exp(-big_b / 2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sig[:, 0, 0], -torch.expm1(-big_b), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name,proc", _processes(), ids=lambda v: v if isinstance(v, str) else "")
def test_stationary_limit(name, proc):
    phi, sig = proc.transition(torch.tensor([4.0], dtype=DT))  # B(4) ~ 79
    torch.testing.assert_close(sig[0], torch.diag(proc.s_inf).detach(), atol=1e-6, rtol=0)
    # and A S_inf + S_inf A^T + 2 D = 0 exactly (stationarity of pi)
    s = torch.diag(proc.s_inf)
    lyap = proc.A @ s + s @ proc.A.T + 2 * proc.D
    assert float(lyap.detach().abs().max()) < 1e-12


def test_non_identity_target_is_stationary():
    proc = preset("cld", s_x2=2.0, s_v2=0.5)
    sig = proc.transition(torch.tensor([6.0], dtype=DT))[1][0]
    torch.testing.assert_close(sig, torch.diag(torch.tensor([2.0, 0.5], dtype=DT)), atol=1e-6, rtol=0)


def test_frozen_structure_rejected():
    res = check_matrices(torch.zeros(2, 2, dtype=DT), torch.diag(torch.tensor([0.0, 1.0], dtype=DT)))
    assert not res.valid and "controllab" in res.reason
    assert not check_structure(2, q_pattern("none", 2), d_pattern("last", 2))
    assert check_structure(2, q_pattern("full", 2), d_pattern("last", 2))  # CLD-like: valid
    assert check_structure(3, q_pattern("chain", 3), d_pattern("last", 3))  # ALDA-like: valid
    assert not check_structure(3, q_pattern("chain", 3), torch.zeros(3, 3, dtype=torch.bool))
    proc = learned(1, q_mask="none", d_mask="last")
    assert not proc.check().valid
    with pytest.raises(InvalidStructureError, match="controllab"):
        proc.validate()
    for name in PRESETS:
        preset(name).validate()


def test_invariants_after_large_lr_training():
    torch.manual_seed(0)
    for d_param in ("full", "diag"):
        qm = q_pattern("chain", 4)
        dm = d_pattern("aux", 4) if d_param == "full" else torch.tensor([False, True, False, True])
        proc = learned(3, q_mask=qm, d_mask=dm, d_param=d_param, init_noise=1.0, seed=3)
        opt = torch.optim.Adam(proc.parameters(), lr=1.0)
        target = torch.randn(4, 4, dtype=DT)
        for _ in range(100):
            opt.zero_grad()
            loss = ((proc.Q - target) ** 2).sum() + ((proc.D + target) ** 2).sum() + proc.transition(torch.tensor([0.5]))[1].sum()
            loss.backward()
            opt.step()
            q, d = proc.Q.detach(), proc.D.detach()
            assert torch.equal(q, -q.T)
            assert torch.equal(d, d.T)
            assert float(torch.linalg.eigvalsh(d).min()) >= -1e-10
        # masked entries exactly zero in Q and D
        assert torch.all(q[~(proc.q_module.mask | proc.q_module.mask.T)] == 0)
        d_support = proc.d_module.mask
        if d_param == "full":
            assert torch.all(proc.d_module.factor().detach()[~d_support] == 0)


def test_gradients_reach_unmasked_only():
    qm = torch.tensor([[0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    dm = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    proc = learned(2, q_mask=qm, d_mask=dm, init_noise=0.3, seed=1)
    phi, sig = proc.transition(torch.tensor([0.2, 0.7], dtype=DT))
    (phi.sum() + sig.pow(2).sum()).backward()
    gu, gl = proc.q_module.u.grad, proc.d_module.l.grad
    assert torch.all(gu[qm] != 0) and torch.all(gu[~qm] == 0)
    assert torch.all(gl[dm] != 0) and torch.all(gl[~dm] == 0)


def test_transition_gradcheck():
    proc = learned(1, init_noise=0.3, seed=0)
    params = list(proc.parameters())

    def f(u, l):
        proc.q_module.u.data, proc.d_module.l.data = u, l
        return proc.transition(torch.tensor([0.3, 0.9], dtype=DT))[1]

    u = params[0].detach().clone().requires_grad_(True)
    l = params[1].detach().clone().requires_grad_(True)

    def g(u_, l_):
        q = (u_ * proc.q_module.mask) - (u_ * proc.q_module.mask).T
        lm = l_ * proc.d_module.mask
        proc.q_module.u = torch.nn.Parameter(u_.detach())
        return q, lm

    # finite differences on the whole map (U, L) -> Sigma
    def sigma_of(u_, l_):
        from mdmsearch.diffusion.process import LinearMDM

        q_mod = type("Q", (torch.nn.Module,), {"forward": lambda self: (u_ * proc.q_module.mask) - (u_ * proc.q_module.mask).T})()
        q_mod.mask = proc.q_module.mask
        d_mod = type("D", (torch.nn.Module,), {"forward": lambda self: (l_ * proc.d_module.mask) @ (l_ * proc.d_module.mask).T, "factor": lambda self: l_ * proc.d_module.mask})()
        d_mod.mask = proc.d_module.mask
        p2 = LinearMDM(q_mod, d_mod, schedule=proc.schedule)
        return p2.transition(torch.tensor([0.3, 0.9], dtype=DT))[1]

    assert torch.autograd.gradcheck(sigma_of, (u, l), eps=1e-6, atol=1e-6)


def test_cholesky_failure_names_q_and_d():
    from mdmsearch.diffusion import fixed_process

    frozen = fixed_process("frozen", q=[[0.0, 0.0], [0.0, 0.0]], d=[[0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(CholeskyError, match=r"'frozen'.*Q=\[\[0, 0\], \[0, 0\]\] D=\[\[0, 0\], \[0, 1\]\]"):
        frozen.kernel(torch.tensor([0.5], dtype=DT), given="xv")
    # while ALDA, near-singular at small t, keeps a positive x-variance in float64
    assert float(preset("alda").kernel(torch.tensor([1e-6], dtype=DT), given="xv").sigma[0, 0, 0]) > 0


@pytest.mark.parametrize("name", ["cld", "malda"])
def test_einsum_equals_dense_reference(name, gen):
    proc = preset(name)
    n, shape = proc.n, (2, 3)
    d = 6
    x = torch.randn(4, *shape, generator=gen, dtype=DT)
    t = torch.tensor([0.01, 0.2, 0.5, 1.0], dtype=DT)
    eps = torch.randn(4, n, *shape, generator=gen, dtype=DT)
    z, _, kern = proc.perturb(x, t, eps=eps)
    for b in range(4):
        # dense state ordering: variable-major, (n*d) vector
        big_phi = torch.kron(kern.phi[b].contiguous(), torch.eye(d, dtype=DT))
        big_l = torch.kron(kern.chol[b].contiguous(), torch.eye(d, dtype=DT))
        z0 = torch.cat([x[b].reshape(-1), torch.zeros((n - 1) * d, dtype=DT)])
        dense = big_phi @ z0 + big_l @ eps[b].reshape(-1)
        torch.testing.assert_close(z[b].reshape(-1), dense, rtol=1e-12, atol=1e-12)
        big_a = torch.kron(proc.A, torch.eye(d, dtype=DT))
        beta = proc.schedule.beta(t[b])
        drift = proc.drift(z[b : b + 1], t[b : b + 1])[0].reshape(-1)
        torch.testing.assert_close(drift, beta * big_a @ z[b].reshape(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(proc.div_drift(t[b : b + 1], d)[0], beta * torch.trace(big_a))


def test_apply_matrix_batched_and_shared(gen):
    z = torch.randn(3, 2, 1, 4, 4, generator=gen)
    m = torch.randn(2, 2, generator=gen, dtype=DT)
    out1 = apply_matrix(m, z)
    out2 = apply_matrix(m.expand(3, 2, 2), z)
    ref = torch.einsum("ij,bjchw->bichw", m.float(), z)
    torch.testing.assert_close(out1, ref)
    torch.testing.assert_close(out2, ref)


def test_prior_terms_match_monte_carlo(gen):
    proc = preset("malda")
    x = torch.randn(3, 5, generator=gen, dtype=DT)
    exact = proc.prior_term(x)
    n_mc = 20000
    xs = x.repeat_interleave(n_mc, 0)
    z, _, _ = proc.perturb(xs, torch.full((xs.shape[0],), proc.T, dtype=DT), generator=gen)
    mc = proc.prior_log_prob(z).reshape(3, n_mc)
    se = mc.std(dim=1) / math.sqrt(n_mc)
    assert torch.all((mc.mean(dim=1) - exact).abs() < 4 * se + 1e-9)
    kl = proc.prior_kl(x)
    assert torch.all(kl >= 0) and torch.all(kl < 1e-2)


def test_structure_hash_and_registry():
    a, b = learned(2, q_mask="chain"), learned(2, q_mask="chain")
    assert a.structure_hash() == b.structure_hash()
    assert a.structure_hash() != learned(2, q_mask="full").structure_hash()
    assert preset("cld").structure_hash() != preset("cld", beta_1=4.0).structure_hash()
    with pytest.raises(ValueError, match="unknown process"):
        preset("nope")
    with pytest.raises(TypeError, match="unknown process option"):
        preset("vpsde", betaa=1)
    # masks are buffers: saved with the state dict
    assert "q_module.mask" in a.state_dict() and "d_module.mask" in a.state_dict()


def test_register_process_in_a_few_lines():
    from mdmsearch.diffusion import PROCESSES, fixed_process, register_process

    @register_process("test_fast_cld")
    def fast_cld(**common):
        return fixed_process("test_fast_cld", q=[[0, -2], [2, 0]], d=[[0, 0], [0, 1]], **common)

    try:
        proc = preset("test_fast_cld", beta_1=5.0)
        assert proc.check().valid and proc.n == 2
    finally:
        PROCESSES.pop("test_fast_cld")


@pytest.mark.parametrize("name,k,d_param", [("vpsde", 0, "full"), ("cld", 1, "full"), ("alda", 2, "full"),
                                            ("malda", 2, "full"), ("malda", 2, "diag")])
def test_learned_init_from_preset_reproduces_its_kernel(name, k, d_param):
    ref = preset(name, gamma=0.04)
    proc = learned(k, init=name, d_param=d_param, gamma=0.04)
    assert torch.allclose(proc.Q, ref.Q, atol=1e-12)
    atol = 1e-5 if d_param == "diag" else 1e-12  # diag: softplus floor 1e-6 on zero entries
    assert torch.allclose(proc.D, ref.D, atol=atol)
    t = torch.tensor([0.05, 0.5, 1.0], dtype=DT)
    phi, sig = proc.transition(t)
    phi_ref, sig_ref = ref.transition(t)
    assert torch.allclose(phi, phi_ref, atol=1e-5) and torch.allclose(sig, sig_ref, atol=1e-5)
    # still learnable: gradients reach every free entry of Q and of D (Q.sum() would be 0 for any
    # skew Q, so weigh the kernel with a fixed random matrix)
    w = torch.randn(3, proc.n, proc.n, dtype=DT, generator=torch.Generator().manual_seed(0))
    (w * proc.transition(t)[1]).sum().backward()
    q_free = proc.q_module.mask
    assert q_free.sum() >= (ref.Q != 0).sum() // 2 and torch.all(proc.q_module.u.grad[q_free] != 0)
    if d_param == "full":
        # (entries of L that start at 0 next to a zero column get no gradient: D = L L^T is
        # stationary there, e.g. the x-entries of L started at CLD)
        d_free = proc.d_module.mask & (proc.d_module.l.detach() != 0)
        assert d_free.any() and torch.all(proc.d_module.l.grad[d_free] != 0)
    else:
        d_free = torch.diagonal(proc.d_module.mask)
        assert d_free.any() and torch.all(proc.d_module.d.grad[d_free] != 0)


def test_learned_init_rejects_mismatches():
    with pytest.raises(ValueError, match="auxiliary"):
        learned(2, init="cld")
    with pytest.raises(ValueError, match="fixed process"):
        learned(1, init="learned")
    with pytest.raises(ValueError, match="fixed process"):
        learned(1, init="nope")
    with pytest.raises(ValueError, match="q_mask"):
        learned(2, q_mask="chain", init="malda")  # MALDA couples x and a
    with pytest.raises(ValueError, match="d_mask"):
        learned(1, d_mask=[[1, 0], [0, 0]], init="cld")  # CLD's noise enters through v


def test_lower_factor_of_singular_psd():
    from mdmsearch.diffusion.presets import _lower_factor

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2, generator=gen, dtype=DT)
    d = a @ a.T  # rank 2, not diagonal
    low = _lower_factor(d)
    assert torch.equal(low, torch.tril(low)) and bool((torch.diagonal(low) >= 0).all())
    assert torch.allclose(low @ low.T, d, atol=1e-12)


@pytest.mark.parametrize("d_param", ["full", "diag"])
def test_parameter_gradients_match_finite_differences(d_param):
    """Autograd through the real Q/D modules (SkewParam, CholeskyPSD, DiagPSD) and the kernel
    equals central finite differences in every free entry: a flipped or lost gradient of Q or D
    (training would walk away from the optimum) fails here."""
    proc = learned(2, init_noise=0.4, seed=3, d_param=d_param)
    t = torch.tensor([0.05, 0.4, 1.0], dtype=DT)
    w = torch.randn(2, 3, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))

    def f():
        phi, sig = proc.transition(t)
        return (w[0] * phi).sum() + (w[1] * sig).sum()

    f().backward()
    checked = 0
    for name, p in proc.named_parameters():
        grad = p.grad.detach().clone()
        for idx in torch.nonzero(grad != 0).tolist() if name.endswith(".u") else torch.nonzero(torch.ones_like(p)).tolist():
            idx = tuple(idx)
            h = 1e-6
            with torch.no_grad():
                p[idx] += h
                fp = float(f())
                p[idx] -= 2 * h
                fm = float(f())
                p[idx] += h
            fd = (fp - fm) / (2 * h)
            assert abs(fd - float(grad[idx])) < 1e-6 * max(1.0, abs(fd)), (name, idx, fd, float(grad[idx]))
            checked += 1
    assert proc.q_module.u.grad.count_nonzero() == 3  # all three pairs of a full Q are free
    assert checked >= 3 + 3
