"""Inner loop: likelihood on Gaussian data, learning Q/D helps, exact resume, CLI artifacts."""

import json
import math
import subprocess
import sys

import pytest
import torch

from mdmsearch.config import parse_run_config
from mdmsearch.errors import ConfigError, NonFiniteLossError
from mdmsearch.objectives import gaussian_log_prob
from mdmsearch.training import Trainer


def _cfg(process, dataset="gaussian", steps=100, **over):
    cfg = {
        "process": process,
        "data": {"name": dataset},
        "model": {"size": "tiny"},
        "optim": {"batch_size": 128, "lr": 3e-3},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 1024, "n_samples": 0, "progress": False},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return parse_run_config(cfg)


@pytest.mark.parametrize("process", [{"name": "vpsde"}, {"name": "learned", "n_aux": 1}], ids=["vpsde", "learned1"])
def test_gaussian_val_elbo_approaches_exact_likelihood(process, tmp_path):
    """Tolerance: the ELBO-BPD is an upper bound of the exact NLL (within 3 SE) and within
    0.15 bits/dim of it after 1500 steps of a tiny MLP."""
    cfg = _cfg(process, steps=1500, data={"n_val": 2048}, train={"eval_examples": 2048, "eval_n_t": 4})
    tr = Trainer(cfg, tmp_path)
    metrics = tr.fit()
    meta = tr.data.meta
    exact = float(-gaussian_log_prob(tr.data.val, meta["mu"], meta["var"]).mean()) / (tr.data.dim * math.log(2))
    se = metrics["val_bpd_se"]
    print(f"{process['name']}: val_bpd {metrics['val_bpd']:.4f} +- {se:.4f}, exact {exact:.4f}")
    assert metrics["val_bpd"] > exact - 3 * se
    assert metrics["val_bpd"] < exact + 0.15


def test_learning_q_and_d_improves_the_elbo(tmp_path):
    """K = 1 on two moons from a slow initial process (D = 0.05 I): learning Q and D (same
    network, same budget) beats keeping the initialization.  Paired comparison: both models
    are evaluated on the same validation points with the same evaluation seed."""
    from mdmsearch.training import evaluate_bpd

    results, per_example = {}, {}
    for plr in (0.0, 0.01):
        cfg = _cfg({"name": "learned", "n_aux": 1, "d_param": "diag", "d_init": 0.05}, dataset="moons", steps=1000,
                   optim={"process_lr": plr}, train={"eval_examples": 256, "time_sampler": "adaptive"})
        cfg.data.n_val = 2048
        tr = Trainer(cfg, tmp_path / str(plr))
        results[plr] = tr.fit()
        tr.net.eval()
        with tr.ema.applied():
            tr.eval_sampler.refresh(tr.process)
            res = evaluate_bpd(tr.process, tr.model, tr.data.val, None, time_sampler=tr.eval_sampler, n_t=8,
                               seed=7, return_all=True)
        per_example[plr] = res["per_example"]
    diff = per_example[0.01] - per_example[0.0]
    se = float(diff.std()) / math.sqrt(diff.numel())
    print(f"moons K=1: initial process val_bpd {float(per_example[0.0].mean()):.4f}, "
          f"learned {float(per_example[0.01].mean()):.4f} (difference {float(diff.mean()):+.4f} +- {se:.4f})")
    assert torch.allclose(torch.tensor(results[0.0]["D"]), 0.05 * torch.eye(2))  # process_lr = 0: the init stays
    assert results[0.01]["D"] != results[0.0]["D"]
    assert float(diff.mean()) < -4 * se


class _Stop(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    def cfg(steps):
        return _cfg({"name": "learned", "n_aux": 2}, dataset="digits", steps=steps,
                    optim={"batch_size": 16}, train={"eval_every": 3, "eval_examples": 16,
                                                     "time_sampler": "adaptive", "adaptive_refresh": 2})

    straight = Trainer(cfg(6), tmp_path / "a")
    straight.fit()

    def kill_at_3(step, metrics):
        if step == 3:
            raise _Stop  # as if the process died right after the step-3 checkpoint

    first = Trainer(cfg(6), tmp_path / "b", callback=kill_at_3)
    with pytest.raises(_Stop):
        first.fit()
    resumed = Trainer(cfg(6), tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.step == 6
    for (na, pa), (nb, pb) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=na)
    torch.testing.assert_close(straight.process.Q, resumed.process.Q, rtol=0, atol=1e-10)
    torch.testing.assert_close(straight.process.D, resumed.process.D, rtol=0, atol=1e-10)
    assert straight.history[-1]["train_loss"] == pytest.approx(resumed.history[-1]["train_loss"], abs=1e-6)
    assert straight.history[-1]["val_bpd"] == pytest.approx(resumed.history[-1]["val_bpd"], abs=1e-6)


def test_run_result_for_complete_stopped_and_resumed_runs(tmp_path):
    """The search's narrow API: a callback raising StopTraining ends the run with a stopped
    result (its progress, the reason); a resumed run replays its restored evaluations through
    the callback first (a pruner judges the whole curve) and completes with the metrics."""
    from mdmsearch.training import StopTraining

    cfg = _cfg({"name": "vpsde"}, dataset="moons", steps=6, optim={"batch_size": 16},
               train={"eval_every": 2, "eval_examples": 16, "test_n_t": 1})
    seen = []

    def prune_at_4(step, metrics):
        seen.append((step, metrics["val_bpd"]))
        if step == 4:
            raise StopTraining("pruned at step 4")

    stopped = Trainer(cfg, tmp_path, callback=prune_at_4).run()
    assert not stopped.completed and stopped.metrics is None and stopped.reason == "pruned at step 4"
    assert stopped.progress.step == 4 and [h["step"] for h in stopped.progress.history] == [2, 4]
    assert stopped.progress.last_val == seen[-1][1]

    seen.clear()
    resumed = Trainer(cfg, tmp_path, callback=lambda step, m: seen.append((step, m["val_bpd"]))).run(replay=True)
    assert resumed.completed and resumed.reason is None
    assert [s for s, _ in seen] == [2, 4, 6]  # 2 and 4 replayed from the checkpoint, then 6
    assert resumed.metrics["steps"] == 6 and resumed.progress.step == 6
    assert math.isfinite(resumed.metrics["test_bpd"])
    again = Trainer(cfg, tmp_path, callback=lambda step, m: seen.append(step)).run(replay=False)
    assert again.completed and again.progress.step == 6  # nothing left to train, nothing replayed


def test_fused_adam_on_cpu_and_checkpoints_of_the_earlier_foreach_optimizer_resume(tmp_path):
    """The trainer steps with fused Adam where the device has it (CPU here), over the network and
    the process groups alike; a checkpoint written by the earlier multi-tensor optimizer (studies
    in flight across an upgrade) still resumes and trains."""
    def cfg(steps):
        return _cfg({"name": "learned", "n_aux": 1}, dataset="moons", steps=steps, optim={"batch_size": 16},
                    train={"eval_every": 2, "eval_examples": 16, "test_n_t": 1})

    tr = Trainer(cfg(2), tmp_path)
    assert len(tr.optimizer.param_groups) == 2 and all(g["fused"] for g in tr.optimizer.param_groups)
    groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in tr.optimizer.param_groups]
    tr.optimizer = torch.optim.Adam(groups, foreach=True)  # as earlier versions built it
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda step: 1.0)
    tr.fit()
    resumed = Trainer(cfg(4), tmp_path)
    assert resumed.try_resume() and resumed.step == 2
    assert math.isfinite(resumed.train_step()) and resumed.step == 3


def test_resume_refuses_another_config(tmp_path):
    Trainer(_cfg({"name": "vpsde"}, dataset="moons", steps=2), tmp_path).fit()
    with pytest.raises(ConfigError, match="different configuration"):
        Trainer(_cfg({"name": "cld"}, dataset="moons", steps=4), tmp_path).fit(resume=True)


def test_nan_loss_is_a_typed_error(tmp_path):
    tr = Trainer(_cfg({"name": "vpsde"}, dataset="moons", steps=5), tmp_path)
    with torch.no_grad():
        for p in tr.net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1 .*Q=.*D="):
        tr.fit()


def test_gradient_clipping_is_clip_grad_norm(tmp_path):
    """Gradients above optim.grad_clip are scaled exactly as clip_grad_norm_ does (network and
    process together), gradients below are left bitwise alone, and a non-finite norm is a typed error."""
    tr = Trainer(_cfg({"name": "learned", "n_aux": 1}, dataset="moons", steps=1, optim={"grad_clip": 0.5}), tmp_path)
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(0)
    for scale in (10.0, 1e-3):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c, p in zip(copies, params):
            c.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(copies, 0.5)  # the reference, on copies
        ref = [c.grad for c in copies]
        before = [p.grad.clone() for p in params]
        tr._clip_gradients()
        for p, e, b in zip(params, ref, before):
            if scale > 1:
                torch.testing.assert_close(p.grad, e)
            else:
                assert torch.equal(p.grad, b)
    params[0].grad[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 1"):
        tr._clip_gradients()


def test_trained_gaussian_samples_match_moments(tmp_path):
    from mdmsearch.sampling import sample

    cfg = _cfg({"name": "vpsde"}, steps=1500)
    tr = Trainer(cfg, tmp_path)
    tr.fit()
    gen = torch.Generator().manual_seed(0)
    with tr.ema.applied():
        x = sample(tr.process, tr.model, 4000, tr.data.shape, sampler="em", steps=200, generator=gen)
    mu, var = tr.data.meta["mu"], tr.data.meta["var"]
    assert torch.allclose(x.mean(0), torch.full((2,), mu), atol=0.05)
    assert torch.allclose(x.var(0), torch.full((2,), var), rtol=0.15)  # a tiny MLP's score, not the oracle


def test_cli_train_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mdmsearch.cli", "train", "--dataset", "digits", "--process", "learned",
           "--n-aux", "2", "--eval-every", "3", "--batch-size", "16", "--n-samples", "16", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd + ["--steps", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and math.isfinite(summary["val_bpd"]) and math.isfinite(summary["test_bpd"])
    for name in ("checkpoint.pt", "metrics.json", "history.csv", "process.json", "qd.png", "samples.png", "config.yaml",
                 "per_example.parquet", "residual_stats.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_bpd", "test_bpd", "Q", "D", "train_seconds"} <= set(metrics)
    assert (metrics["val_n_t"], metrics["test_n_t"]) == (32, 32)  # final evaluation: test_n_t on both splits
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume with a larger budget, then evaluate and sample from the checkpoint
    proc = subprocess.run(cmd + ["--steps", "9", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 9
    ev = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "evaluate", str(out), "--n", "32", "--n-t", "1"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert math.isfinite(json.loads(ev.stdout)["test_bpd"]) and json.loads(ev.stdout)["n_t"] == 1
    sm = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "sample", str(out), "--n", "8", "--steps", "10",
                         "--out", str(tmp_path / "s.png")], capture_output=True, text=True, timeout=300)
    assert sm.returncode == 0, sm.stderr
    assert (tmp_path / "s.png").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "mnist"),
        (["--dataset", "nope"], "unknown dataset"),
        (["--process", "learned", "--n-aux", "-1"], "n_aux"),
        (["--steps", "0"], "--steps 0"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "train", "--out", str(tmp_path / "o"), "--quiet", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_learned_process_config_can_start_at_a_preset():
    cfg = parse_run_config({"process": {"name": "learned", "n_aux": 1, "init": "cld"}})
    proc = cfg.process.build()
    assert proc.Q.tolist() == [[0.0, -1.0], [1.0, 0.0]]
    torch.testing.assert_close(proc.D, torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    assert all(p.requires_grad for p in proc.parameters())
    for bad, needle in [({"n_aux": 2, "init": "cld"}, "n_aux is 2"), ({"init": "nope"}, "init must be one of"),
                        ({"name": "cld", "init": "cld"}, "learned processes only")]:
        with pytest.raises(ConfigError, match=needle):
            parse_run_config({"process": {"name": "learned", "n_aux": 1, **bad}})


def test_progress_is_a_few_log_lines_when_stderr_is_a_file(tmp_path):
    """A `train` whose stderr is a file (a search worker, CI) writes one plain line per tenth
    of the run, not a bar redrawn at every step (which wrote ~2000 carriage returns per run)."""
    import os
    import subprocess
    import sys

    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "train", "--dataset", "gaussian", "--steps", "200",
                              "--eval-every", "200", "--n-samples", "0", "--out", str(tmp_path / "run")],
                             stderr=fh, stdout=subprocess.PIPE, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if "train: step" in ln]
    assert "\r" not in text and 10 <= len(lines) <= 12, lines
    assert "train: step 200/200 (100%)" in lines[-1] and "ETA" in lines[0]


def test_progress_on_a_terminal_is_a_bar():
    from mdmsearch.training.progress import StepProgress

    bar = StepProgress(5, tty=True)
    for _ in range(5):
        bar.update(1.0, 2.0)
    assert bar._bar is not None and bar._bar.n == 5
    bar.close()
