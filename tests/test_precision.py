"""Mixed precision (model.precision): only the network runs under autocast; the process, the
Gaussian part and the ELBO keep their dtypes; bf16 trains to the BPD of fp32; fp16 scales its
loss and checkpoints the scaler."""

import math
import statistics

import pytest
import torch

from mdmsearch.config import parse_run_config
from mdmsearch.errors import ConfigError, NonFiniteLossError
from mdmsearch.training import Trainer
from mdmsearch.training.precision import Autocast, autocast_network

STEPS = 60


def _cfg(precision, steps=STEPS, seed=0, **train):
    return parse_run_config({
        "process": {"name": "learned", "n_aux": 1}, "data": {"name": "digits"},
        "model": {"size": "tiny", "precision": precision}, "optim": {"batch_size": 32},
        "train": {"steps": steps, "eval_examples": 270, "eval_n_t": 8, "n_samples": 0, "progress": False,
                  "seed": seed, **train}})


def test_bf16_trains_to_the_bpd_of_fp32(tmp_path):
    """Digits, learned K = 1 (mixed predictor), 60 steps of batch 32, seed 0, validation BPD on
    all 270 examples with 8 strata: bf16 minus fp32 is -0.0005 bpd here, and |bf16 - fp32| was
    at most 0.0009 bpd over seeds 0-7 (the SE of either BPD is 0.02).  Tolerance 0.005 bpd:
    over 5x the largest measured difference, a quarter of one run's SE (docs/training.md)."""
    results = {}
    for precision in ("fp32", "bf16"):
        tr = Trainer(_cfg(precision), tmp_path / precision)
        before = tr.evaluate("val")["bpd"]
        losses = [tr.train_step() for _ in range(STEPS)]
        tr._last_eval = None
        results[precision] = (before, losses, tr.evaluate("val")["bpd"])
    before, losses, after = results["bf16"]
    assert all(math.isfinite(v) for v in losses)
    assert statistics.mean(losses[-20:]) < statistics.mean(losses[:20]) - 0.1
    assert after < before - 0.2, (before, after)  # (3.857 -> 3.468 here)
    diff = after - results["fp32"][2]
    print(f"bf16 {after:.4f} fp32 {results['fp32'][2]:.4f} difference {diff:+.5f} bpd")
    assert abs(diff) < 0.005


def test_autocast_covers_the_network_only(tmp_path):
    """Under bf16 the network computes in bf16, the ELBO receives its output in the data's
    float32, and Q, D, their gradients, Adam's state and the EMA stay float64."""
    tr = Trainer(_cfg("bf16", steps=2), tmp_path)
    assert isinstance(tr.model.net, Autocast) and tr.model.net.net is tr.net  # (mixed: eps_G + autocast(net))
    seen = {}

    def record(name):
        def hook(module, inputs, out):
            seen.setdefault(name, (inputs[0].dtype, out.dtype))  # (returns None: the output stays)
        return hook

    tr.net.register_forward_hook(record("net"))
    tr.model.net.register_forward_hook(record("fed"))
    autocast_in_process = []  # was autocast on while the process computed its kernels?
    for name in ("kernel", "kernel_and_end"):
        original = getattr(tr.process, name)

        def spy(*args, _original=original, **kwargs):
            autocast_in_process.append(torch.is_autocast_enabled("cpu"))
            return _original(*args, **kwargs)
        setattr(tr.process, name, spy)
    tr.train_step()
    assert autocast_in_process and not any(autocast_in_process)  # the process math is outside autocast
    assert seen["net"][1] == torch.bfloat16  # the network computes in bf16
    assert seen["fed"] == (torch.float32, torch.float32)  # the ELBO's data dtype, in and out
    assert tr.process_params and all(p.dtype == torch.float64 and p.grad.dtype == torch.float64
                                     for p in tr.process_params)
    assert tr.process.Q.dtype == tr.process.D.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in tr.net.parameters())
    state = tr.optimizer.state[tr.process_params[0]]
    assert state["exp_avg"].dtype == torch.float64
    assert {s.dtype for s in tr.ema.shadow[-len(tr.process_params):]} == {torch.float64}
    assert tr.loss(tr.train_x[:8]).dtype == torch.float64
    assert tr.scaler is None  # bf16 needs no loss scaling


def test_fp32_is_the_network_itself(tmp_path):
    tr = Trainer(_cfg("fp32", steps=1), tmp_path)
    assert tr.model.net is tr.net and tr.scaler is None


def test_fp16_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    """fp16 (on CPU too: autocast there, slow) trains through a GradScaler; its scale is in the
    checkpoint and a resumed run continues with it."""
    tr = Trainer(_cfg("fp16", steps=4, eval_every=4, eval_examples=16, test_n_t=1), tmp_path)
    assert isinstance(tr.scaler, torch.amp.GradScaler) and tr.scaler.is_enabled()
    tr.fit()
    assert tr.step == 4 and math.isfinite(tr.history[-1]["val_bpd"])
    tr.scaler.update(1024.0)  # (a scale the fresh scaler would not have)
    tr.save()
    resumed = Trainer(_cfg("fp16", steps=6, eval_every=4, eval_examples=16, test_n_t=1), tmp_path)
    assert resumed.try_resume() and resumed.scaler.get_scale() == 1024.0
    assert math.isfinite(resumed.train_step())


def test_fp16_skips_an_overflowing_step_instead_of_failing(tmp_path):
    """An fp16 step whose gradients overflow is skipped by the scaler (weights unchanged, scale
    halved); in fp32 a non-finite gradient is an error."""
    tr = Trainer(_cfg("fp16", steps=2), tmp_path)
    tr.scaler.load_state_dict({**tr.scaler.state_dict(), "scale": 2.0 ** 120})  # scaled gradients overflow
    before = [p.detach().clone() for p in [*tr.net.parameters(), *tr.process_params]]
    tr.train_step()
    assert tr.scaler.get_scale() == 2.0 ** 119
    assert all(torch.equal(a, p) for a, p in zip(before, [*tr.net.parameters(), *tr.process_params]))  # Q, D too
    fp32 = Trainer(_cfg("fp32", steps=2), tmp_path / "fp32")
    fp32.loss(fp32.train_x[:8]).backward()
    next(fp32.net.parameters()).grad.fill_(math.inf)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient"):
        fp32._clip_gradients()


def test_precision_errors_are_one_line():
    with pytest.raises(ConfigError, match="model.precision"):
        parse_run_config({"model": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="needs autocast"):
        autocast_network(torch.nn.Linear(2, 2), "bf16", torch.device("meta"))


def test_precision_at_its_default_leaves_dumps_and_hashes_alone():
    """A configuration that does not use the new fields dumps exactly as before they existed (the
    search hashes these dumps, checkpoints compare them); a used one is in the dump."""
    default = parse_run_config({})
    assert "precision" not in default.model.model_dump() and "devices" not in default.train.model_dump()
    assert "precision" not in default.model_dump_json()
    used = parse_run_config({"model": {"precision": "bf16"}, "train": {"devices": 2}})
    assert used.model.model_dump()["precision"] == "bf16" and used.train.model_dump()["devices"] == 2
    assert parse_run_config(used.model_dump(mode="json")) == used
