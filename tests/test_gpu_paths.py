"""The code paths a GPU takes, checked on CPU where a CPU can show them (issue 32).

Checkpoints written on a GPU machine (CUDA-shaped generator states, more GPUs than here), the
GPU count a data-parallel process checks, the deferred step (the loss, gradient norm and
process checks kept on the device and read once per logging step) against the host's step,
fp16 overflowing in the forward pass, GPUs in searches (Ray resources, local workers), and the
declared torch floor.  What only a GPU shows is in benchmarks/gpu_check.sh.
"""

import importlib
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from mdmsearch.config import parse_run_config
from mdmsearch.diffusion import ops
from mdmsearch.errors import CholeskyError, ConfigError, MDMError, NonFiniteLossError
from mdmsearch.training import CHECKPOINT, Trainer, load_checkpoint
from mdmsearch.training import trainer as trainer_module
from mdmsearch.training.checkpoint import save_checkpoint
from mdmsearch.training.ledger import OVERFLOW_LIMIT

ROOT = Path(__file__).resolve().parents[1]
CUDA_PHILOX_STATE = 16  # bytes of a CUDA generator's state (seed + offset); the CPU's is 5056


def _cfg(process=None, steps=6, precision="fp32", dataset="digits", **train):
    return parse_run_config({
        "process": process or {"name": "vpsde"}, "data": {"name": dataset},
        "model": {"size": "tiny", "precision": precision}, "optim": {"batch_size": 16},
        "train": {"steps": steps, "eval_every": 3, "eval_examples": 32, "test_n_t": 1, "n_samples": 0,
                  "progress": False, "device": "cpu", **train}})


def _weights(tr: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*tr.net.parameters(), *tr.process_params]]


# ---------------------------------------------------------------------- checkpoints from a GPU machine
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 6-step digits run (VPSDE, tiny U-Net) with its checkpoint."""
    out = tmp_path_factory.mktemp("digits_run")
    Trainer(_cfg(), out).fit()
    return out


def _with_cuda_noise_state(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` whose noise generator state is CUDA's (16 bytes), as a checkpoint of
    a ``device: auto`` run written on a GPU machine holds it."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    state = load_checkpoint(dst / CHECKPOINT, map_location="cpu")
    state["rng"]["noise"] = torch.arange(CUDA_PHILOX_STATE, dtype=torch.uint8)
    save_checkpoint(dst / CHECKPOINT, state)
    return dst


def test_evaluate_and_sample_use_no_training_generator(digits_run, tmp_path, capsys):
    """`mdmsearch evaluate` / `sample` on a checkpoint whose noise state is CUDA's: they need no
    training generator, so they run (before: RuntimeError 'Expected a CPUGeneratorImplState')."""
    from mdmsearch.cli import main

    moved = _with_cuda_noise_state(digits_run, tmp_path / "moved")
    assert main(["evaluate", str(moved), "--n", "16", "--n-t", "1"]) == 0
    moved_out = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(digits_run), "--n", "16", "--n-t", "1"]) == 0
    assert moved_out == json.loads(capsys.readouterr().out)  # the same model, the same numbers
    assert main(["sample", str(moved), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_evaluate_loads_the_checkpoint_on_the_host(digits_run, monkeypatch):
    """The commands load a checkpoint with map_location="cpu" only: loaded onto the run's GPU, its
    generator states would be CUDA tensors, which torch refuses as RNG states (TypeError)."""
    import mdmsearch.training as training
    from mdmsearch.cli import _load_trainer

    seen = []
    real = training.load_checkpoint

    def spy(path, map_location=None):
        seen.append(map_location)
        return real(path, map_location=map_location)

    monkeypatch.setattr(training, "load_checkpoint", spy)
    _load_trainer(str(digits_run))
    assert seen and all(m == "cpu" for m in seen), seen


def test_resume_across_device_types_continues_with_a_fresh_noise_stream(digits_run, tmp_path, caplog):
    """`train --resume` of a checkpoint whose noise generator is CUDA's, on a CPU: the run continues
    (from the checkpoint's weights and step) with a noise stream seeded from (seed, step), and says so."""
    moved = _with_cuda_noise_state(digits_run, tmp_path / "moved")
    tr = Trainer(_cfg(steps=9), moved)
    with caplog.at_level(logging.WARNING, logger="mdmsearch.training.state"):
        assert tr.try_resume()
    assert tr.step == 6 and "noise generator is of another device type" in caplog.text
    reseeded = tr.noise_gen.get_state()
    again = Trainer(_cfg(steps=9), moved)
    again.try_resume()
    assert torch.equal(again.noise_gen.get_state(), reseeded)  # (seed, step) decides it: reproducible
    tr.fit()
    assert tr.step == 9 and math.isfinite(tr.history[-1]["val_bpd"])


def test_cuda_states_of_more_gpus_restore_on_the_gpus_this_process_sees(digits_run, monkeypatch):
    """A checkpoint written with 2 GPUs visible, resumed with 1 (CUDA_VISIBLE_DEVICES=0, a Ray
    trial): the first state is restored, the second left (set_rng_state_all raised IndexError)."""
    import torch.cuda.random as cuda_random

    visible, restored = 1, []

    def set_rng_state(state, device="cuda"):  # torch's own IndexError for a GPU that is not there
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= visible:
            raise IndexError(f"list index out of range (device {index})")
        assert state.dtype == torch.uint8 and state.device.type == "cpu"
        restored.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(cuda_random, "set_rng_state", set_rng_state)  # (what set_rng_state_all calls)
    state = load_checkpoint(digits_run / CHECKPOINT, map_location="cpu")
    state["rng"]["cuda"] = [torch.zeros(CUDA_PHILOX_STATE, dtype=torch.uint8)] * 2
    tr = Trainer(_cfg(), digits_run.parent / "unused")
    tr.load_state_dict(state)
    assert restored == [0]


# ---------------------------------------------------------------------- devices of processes
def test_a_process_needs_a_gpu_on_its_own_machine(monkeypatch):
    """2-node torchrun, one GPU per node: each process has its node's GPU (the group's size was
    compared with the local count and refused it); too few GPUs on this machine stay one line."""
    from mdmsearch.training.distributed import rank_device
    from mdmsearch.training.launch import local_world_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert rank_device("cuda", 0, 2, local_world_size(2)) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes on this machine need 2 GPUs, it has 1"):
        rank_device("cuda", 1, 2, local_world_size(2))
    assert rank_device("cpu", 1, 2, 2) == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_one_line(tmp_path, capsys):
    from mdmsearch.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["train", "--dataset", "moons", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sees 0 CUDA GPU(s); use cpu or auto" in err
    assert not (tmp_path / "r" / CHECKPOINT).exists()


# ---------------------------------------------------------------------- the deferred step
def _train(process, deferred: bool, tmp: Path, steps=6, **over) -> Trainer:
    tr = Trainer(_cfg(process, steps=steps, **over), tmp)
    tr.deferred = deferred
    tr.fit()
    return tr


@pytest.mark.parametrize("process", [{"name": "vpsde"}, {"name": "learned", "n_aux": 2}], ids=["vpsde", "learned2"])
def test_deferred_steps_are_the_host_steps(process, tmp_path, monkeypatch):
    """The step a GPU takes (nothing read on the host between logging steps) computes on CPU what
    the host-checked step computes, bit for bit: weights, smoothed loss, history.  (A learned
    process's plan keeps one squaring of headroom on a GPU; 1.0 here makes the counts equal.)"""
    monkeypatch.setattr(trainer_module, "PLAN_HEADROOM", 1.0)
    host = _train(process, False, tmp_path / "host")
    deferred = _train(process, True, tmp_path / "deferred")
    assert all(torch.equal(a, b) for a, b in zip(_weights(host), _weights(deferred)))
    assert host.running_loss == deferred.running_loss and host.history == [
        {**row, "train_seconds": h["train_seconds"]} for row, h in zip(deferred.history, host.history)]


def test_the_headroom_of_a_learned_process_changes_rounding_only(tmp_path):
    """With PLAN_HEADROOM (one squaring more than needed) the kernels are as exact: the run differs
    from the host's only in rounding."""
    process = {"name": "learned", "n_aux": 2}
    host = _train(process, False, tmp_path / "host")
    deferred = _train(process, True, tmp_path / "deferred")
    for a, b in zip(_weights(host), _weights(deferred)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert math.isclose(host.history[-1]["val_bpd"], deferred.history[-1]["val_bpd"], rel_tol=1e-6)


_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")


def test_a_deferred_step_reads_nothing_from_the_device(tmp_path, monkeypatch):
    """Between two logging steps a deferred step calls none of the tensor methods that copy a value
    to the host (each waits for a GPU's queue): spied on the Tensor class for three steps of a
    learned process with the mixed predictor (the Cholesky check, the squaring count, the loss,
    the gradient norm all stay on the device).  The host-checked step reads each of them."""
    cfg = _cfg({"name": "learned", "n_aux": 2})  # (K > 0: the mixed predictor by default)
    counts = {}
    for deferred in (False, True):
        tr = Trainer(cfg, tmp_path / str(deferred))
        tr.deferred = deferred
        tr._step()  # (first step: the plan's norm is read once, as at every logging step)
        calls: Counter = Counter()
        with monkeypatch.context() as m:
            for name in _READS:
                real = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: (calls.update([_n]), _r(self, *a, **k))[1])
            for _ in range(3):
                tr._step()
        counts[deferred] = sum(calls.values())
    assert counts[True] == 0 and counts[False] >= 3 * 3, counts


def test_a_nan_is_found_at_the_next_read_and_names_its_step(tmp_path):
    tr = Trainer(_cfg(steps=5), tmp_path)
    tr.deferred = True
    with torch.no_grad():
        for p in tr.net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1 .*Q=.*D="):
        tr.fit()
    assert not (tmp_path / CHECKPOINT).exists()  # the read comes before the checkpoint


def test_a_failed_cholesky_or_a_too_small_bound_is_found_at_the_read(tmp_path):
    """The plan's device flags: a Cholesky that failed (CholeskyError at the read, with the step),
    and a squaring count below what Q and D need (the norm outgrew its bound)."""
    tr = Trainer(_cfg({"name": "learned", "n_aux": 1}), tmp_path)
    tr.deferred = True
    plan = ops.HostPlan(block_norm=1e-6, max_b=1.0)  # far too small a bound: one squaring, radius check
    with ops.planned(plan):
        tr.process.kernel(torch.tensor([1.0], dtype=torch.float64))
        tr.process.cholesky(-torch.eye(tr.process.n, dtype=torch.float64)[None])  # not PD: no raise here
    assert set(plan.flags) == {"radius", "cholesky"} and all(bool(f) for f in plan.flags.values())
    tr._step()
    tr._ledger.add_flags({"cholesky": plan.flags["cholesky"]}, 7)
    with pytest.raises(CholeskyError, match="not positive definite at step 7"):
        tr._settle()
    tr._step()
    tr._ledger = None
    tr._step()
    tr._ledger.add_flags({"radius": plan.flags["radius"]}, 9)
    with pytest.raises(NonFiniteLossError, match="at step 9 the norm of Q and D had grown"):
        tr._settle()


def test_the_host_plan_counts_as_the_device_does():
    """squarings_for on the host = _squarings on the device, and the constants reach a device once."""
    for value in (0.0, 1e-9, 1.0, 2.0, 2.000001, 3.9, 4.0, 17.3, 1e6):
        assert ops.squarings_for(value) == int(ops._squarings(torch.tensor(value, dtype=torch.float64)))
    assert ops._constant("k", torch.float64, torch.device("cpu")) is ops._constant("k", torch.float64, torch.device("cpu"))


# ---------------------------------------------------------------------- fp16
def _overflowing_fp16(tmp: Path) -> Trainer:
    """fp16 (CPU autocast) with the network's weights so large that its forward pass overflows
    (the loss is inf or nan whatever the loss scale)."""
    tr = Trainer(_cfg(precision="fp16", steps=OVERFLOW_LIMIT + 5), tmp)
    with torch.no_grad():
        for p in tr.net.parameters():
            p.fill_(6e4)
    return tr


@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
def test_fp16_skips_a_step_whose_forward_overflows(deferred, tmp_path):
    """An inf forward under fp16: the scaler skips the step (weights unchanged, scale halved)
    instead of the non-finite-loss error; OVERFLOW_LIMIT such steps in a row end the run with a
    line that says what to do."""
    tr = _overflowing_fp16(tmp_path)
    tr.deferred = deferred
    before, scale = _weights(tr), tr.scaler.get_scale()
    assert not math.isfinite(tr.train_step())
    assert tr.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tr)))
    if deferred:
        tr._settle()
        assert tr.running_loss is None  # a skipped step's loss is not smoothed in
    tr.step = 0
    tr._overflows = 0
    with pytest.raises(NonFiniteLossError, match=f"{OVERFLOW_LIMIT} consecutive fp16 steps .* use model.precision bf16"):
        tr.fit()


# ---------------------------------------------------------------------- GPUs in searches
def _spec(**over):
    from mdmsearch.search.spec import SearchSpec

    budget = over.pop("budget", {})
    return SearchSpec.model_validate({"study": "g", "budget": budget, **over})


def test_ray_trials_ask_for_gpus_by_their_device():
    from mdmsearch.search.gpus import trial_resources

    assert trial_resources(_spec(budget={"device": "auto"}), cluster_gpus=0) == {"cpu": 1, "gpu": 0}
    assert trial_resources(_spec(budget={"device": "auto"}), cluster_gpus=8)["gpu"] == 1  # (was 0: GPUs hidden)
    assert trial_resources(_spec(budget={"device": "cuda", "devices": 2}), cluster_gpus=8)["gpu"] == 2
    assert trial_resources(_spec(budget={"device": "cpu"}), cluster_gpus=8)["gpu"] == 0
    shared = trial_resources(_spec(budget={"device": "auto"}, resources={"cpu": 1, "gpu": 0.25}), cluster_gpus=1)
    assert shared["gpu"] == 0.25  # four small trials on one card (refused before)
    with pytest.raises(MDMError, match=r"resources.gpu 1 per trial, but the Ray cluster has 0 GPU"):
        trial_resources(_spec(budget={"device": "cuda"}), cluster_gpus=0)
    with pytest.raises(MDMError, match="Ray hides the GPUs"):
        trial_resources(_spec(budget={"device": "cuda"}, resources={"cpu": 1, "gpu": 0}), cluster_gpus=4)
    with pytest.raises(MDMError, match="set resources.gpu to 2"):
        trial_resources(_spec(budget={"device": "cuda", "devices": 2}, resources={"gpu": 0.5}), cluster_gpus=4)
    with pytest.raises(Exception, match="fraction below 1"):
        _spec(resources={"gpu": 1.5})


def test_local_workers_spread_over_the_visible_gpus(monkeypatch):
    from mdmsearch.search.gpus import check_local_gpus, visible_gpus, worker_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    visible = visible_gpus()
    assert visible == ["3", "5"]
    auto = _spec(budget={"device": "auto"})
    assert [worker_gpus(auto, i, visible) for i in range(3)] == ["3", "5", "3"]  # (all on cuda:0 before)
    pairs = _spec(budget={"device": "cuda", "devices": 2})
    assert [worker_gpus(pairs, i, visible) for i in range(2)] == ["3,5", "3,5"]
    assert worker_gpus(_spec(budget={"device": "cpu"}), 1, visible) is None
    assert worker_gpus(_spec(budget={"device": "cuda:1"}), 0, visible) is None  # the spec's one GPU
    check_local_gpus(pairs, visible)
    with pytest.raises(MDMError, match="needs 3 GPU"):
        check_local_gpus(_spec(budget={"device": "cuda:2"}), visible)
    with pytest.raises(MDMError, match="no CUDA GPU visible"):
        check_local_gpus(auto.model_copy(update={"budget": pairs.budget}), [])


def test_a_local_search_that_asks_for_absent_gpus_is_one_line(tmp_path, capsys):
    from mdmsearch.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"study: g\nstudies_dir: {tmp_path / 'studies'}\nbudget: {{device: cuda}}\n")
    assert main(["run", str(spec)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "budget.device cuda: this machine has no CUDA GPU visible" in errors[0]
    assert not list((tmp_path / "studies").rglob("*.log"))  # no study was opened


# ---------------------------------------------------------------------- sample quality
def test_quality_features_run_on_the_runs_device(monkeypatch):
    """The extractor is asked for on the run's device (Inception defaulted to CUDA whatever the run)."""
    from mdmsearch.quality import features

    seen = []
    monkeypatch.setitem(features.EXTRACTORS, "spy", lambda data, device=None: seen.append(device))
    features.get_extractor("spy", None, torch.device("cpu"))
    assert seen == [torch.device("cpu")]


def test_sample_quality_draws_in_chunks(tmp_path, monkeypatch):
    """quality.n above QUALITY_CHUNK is drawn in chunks (not one batch of n), the first chunk from
    the quality seed itself, and scored on the run's device."""
    from mdmsearch.config import QualityConfig
    from mdmsearch.training import inference

    monkeypatch.setattr(inference, "QUALITY_CHUNK", 4)
    drawn, scored = [], {}
    real = inference.draw_samples

    def draw(run, n, shape, **kw):
        drawn.append((n, kw["seed"]))
        return real(run, n, shape, **kw)

    def score(pixels, data, **kw):
        scored.update(n=int(pixels.shape[0]), device=kw.get("device"))
        return {"kid": 0.0, "kid_se": 0.0, "fid": 0.0}

    import mdmsearch.quality as quality

    monkeypatch.setattr(inference, "draw_samples", draw)
    monkeypatch.setattr(quality, "score_samples", score)
    tr = Trainer(_cfg(), tmp_path)
    inference.sample_quality(tr, QualityConfig(n=10, nfe=2, seed=5), tr.data, t_min=1e-3)
    assert [n for n, _ in drawn] == [4, 4, 2] and drawn[0][1] == 5 and len({s for _, s in drawn}) == 3
    assert scored == {"n": 10, "device": tr.device}


# ---------------------------------------------------------------------- the torch floor
# APIs the package calls, and the torch release that introduced them
TORCH_APIS = {
    "torch.nn.utils.get_total_norm": (2, 6),
    "torch.nn.utils.clip_grads_with_norm_": (2, 6),
    "torch.amp.GradScaler": (2, 3),
    "torch.amp.is_autocast_available": (2, 4),
}


def _floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def test_the_declared_torch_floor_has_the_apis_the_code_calls():
    """pyproject's torch lower bound is at least the release of every API in TORCH_APIS (torch 2.2-2.5
    raised AttributeError at the first clipped step), and the code does call them."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if re.match(r"torch\s*[><=]", d))
    vision_req = next(d for d in deps if d.startswith("torchvision"))
    assert _floor(torch_req) >= max(TORCH_APIS.values()), torch_req
    assert _floor(vision_req) >= (0, 21), vision_req  # torchvision 0.21 is torch 2.6's
    source = "\n".join(p.read_text() for p in (ROOT / "mdmsearch").rglob("*.py"))
    for api in TORCH_APIS:
        name = api.rsplit(".", 1)[1]
        assert name in source, f"{api} is no longer called: drop it from TORCH_APIS"
        owner, attr = api.rsplit(".", 1)
        assert hasattr(importlib.import_module(owner), attr), api  # (present in the installed torch)
