"""Seed streams and common random numbers in training (train.streams, train.seeds).

A stream set apart changes its own draws only; two structures trained with the same seed draw
the same batches, times, data-coordinate noise and initial weights of the layers whose shape does
not depend on K; ``streams: shared`` is the one stream of earlier versions; old configurations
and checkpoints still load and resume."""

import logging

import pytest
import torch

from mdmsearch.config import parse_run_config, upgrade_saved_config
from mdmsearch.diffusion.process import LinearMDM
from mdmsearch.errors import ConfigError
from mdmsearch.training import Trainer
from mdmsearch.training.checkpoint import load_checkpoint, save_checkpoint

VPSDE = {"name": "vpsde"}
K3 = {"name": "learned", "n_aux": 3, "q_mask": "chain", "d_mask": "diag"}


def _cfg(process=VPSDE, steps=4, **train):
    return parse_run_config({
        "process": process, "data": {"name": "digits"},
        "model": {"name": "unet", "size": "tiny", "parameterization": "mixed"},
        "optim": {"batch_size": 16},
        "train": {"steps": steps, "eval_every": steps, "eval_examples": 16, "test_n_t": 1, "n_samples": 0,
                  "progress": False, "device": "cpu", "seed": 7, **train}})


def _draws(tr: Trainer, monkeypatch, steps: int = 2) -> list[dict]:
    """What the trainer's steps draw: the batch, the model-space x (dequantized), t and eps of every
    call of the forward process (recorded around the real LinearMDM.perturb)."""
    seen, real = [], LinearMDM.perturb

    def recording(self, x, t, **kw):
        z, eps, kern = real(self, x, t, **kw)
        seen.append({"x": x.detach().clone(), "t": kern.t.detach().clone(), "eps": eps.detach().clone()})
        return z, eps, kern

    monkeypatch.setattr(LinearMDM, "perturb", recording)
    batches, real_batch = [], tr._batch

    def recording_batch():
        batches.append(real_batch())
        return batches[-1]

    monkeypatch.setattr(tr, "_batch", recording_batch)
    for _ in range(steps):
        tr.train_step()
    monkeypatch.setattr(LinearMDM, "perturb", real)
    return [{"batch": b, **s} for b, s in zip(batches, seen)]


def _layers(net: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The network's layers that hold parameters of their own: name -> [parameters]."""
    return {name: [p.detach() for p in m.parameters(recurse=False)]
            for name, m in net.named_modules() if list(m.parameters(recurse=False))}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- common random numbers across K
def test_structures_of_one_seed_draw_the_same_batches_times_and_data_noise(tmp_path, monkeypatch):
    """VPSDE (K = 0) and a learned K = 3 process under one seed: the same batches, the same
    dequantized data, the same t and the same eps on the data coordinate, step after step; the
    auxiliaries' noise comes on top.  With the one shared stream of earlier versions the eps of
    the data coordinate differ (the K = 3 draws interleave 4 coordinates per example)."""
    a = _draws(Trainer(_cfg(VPSDE), tmp_path / "a"), monkeypatch)
    b = _draws(Trainer(_cfg(K3), tmp_path / "b"), monkeypatch)
    for da, db in zip(a, b):
        assert torch.equal(da["batch"], db["batch"])
        assert torch.equal(da["x"], db["x"])  # same dequantization
        assert torch.equal(da["t"], db["t"])  # (both t ~ vp: same uniforms, same t)
        assert da["eps"].shape[1] == 1 and db["eps"].shape[1] == 4
        assert torch.equal(da["eps"][:, 0], db["eps"][:, 0])
    old_a = _draws(Trainer(_cfg(VPSDE, streams="shared"), tmp_path / "c"), monkeypatch)
    old_b = _draws(Trainer(_cfg(K3, streams="shared"), tmp_path / "d"), monkeypatch)
    assert torch.equal(old_a[0]["batch"], old_b[0]["batch"])
    assert not torch.equal(old_a[0]["eps"][:, 0], old_b[0]["eps"][:, 0])


def test_layers_whose_shape_does_not_depend_on_k_start_with_the_same_weights(tmp_path):
    """Every layer of the U-Net except the input convolution (n = K + 1 variables in) and the
    zero-initialized output starts bit for bit alike for K = 0 and K = 3 under one seed; with
    the shared stream (construction order) only the time embedding's, built before the input
    convolution, does."""
    for shared in (False, True):
        extra = {"streams": "shared"} if shared else {}
        la = _layers(Trainer(_cfg(VPSDE, **extra), tmp_path / "a").net)
        lb = _layers(Trainer(_cfg(K3, **extra), tmp_path / "b").net)
        assert la.keys() == lb.keys()
        shaped_alike = [n for n in la if [p.shape for p in la[n]] == [p.shape for p in lb[n]]]
        assert set(la) - set(shaped_alike) == {"conv_in", "conv_out"}
        random = [n for n in shaped_alike if any(p.unique().numel() > 2 for p in la[n])]  # not 0/1-initialized
        assert len(random) > 20
        same = [n for n in random if _same(la[n], lb[n])]
        assert same == ([n for n in random if n.startswith("time_mlp.")] if shared else random), same


# ---------------------------------------------------------------- streams set apart
def _start(tmp_path, name, **seeds):
    """A trainer's starting point under train.seeds: initial weights, first batch, first draws
    of its time and noise generators (generators cloned: the trainer's are left as they are)."""
    tr = Trainer(_cfg(K3, seeds=seeds) if seeds else _cfg(K3), tmp_path / name)
    gen = {}
    for key in ("time", "noise", "aux", "deq"):
        g = torch.Generator().set_state(getattr(tr, f"{key}_gen").get_state())
        gen[key] = torch.rand(8, generator=g)
    return {"weights": [p.detach().clone() for p in tr.net.parameters()], "process": tr.process.Q.detach().clone(),
            "batch": tr._batch(), **gen}


def _equal(a, b):
    if isinstance(a, list):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("stream, changes", [
    ("init", {"weights"}),
    ("data", {"batch", "deq"}),
    ("diffusion", {"time", "noise", "aux"}),
])
def test_a_stream_set_apart_changes_only_its_draws(tmp_path, stream, changes):
    base = _start(tmp_path, "base")
    assert _equal(base["weights"], _start(tmp_path, "same", **{stream: 7})["weights"])  # 7 = train.seed: the same run
    moved = _start(tmp_path, "moved", **{stream: 8})
    differ = {k for k in base if not _equal(base[k], moved[k])}
    assert differ == changes


def test_a_learned_process_with_initial_noise_takes_it_from_the_init_stream(tmp_path):
    noisy = dict(K3, init_noise=0.3)
    q = Trainer(_cfg(noisy), tmp_path / "a").process.Q.detach()
    assert torch.equal(q, Trainer(_cfg(noisy, seeds={"data": 3, "diffusion": 4}), tmp_path / "b").process.Q.detach())
    assert not torch.equal(q, Trainer(_cfg(noisy, seeds={"init": 3}), tmp_path / "c").process.Q.detach())


# ---------------------------------------------------------------- configurations and checkpoints
def test_stream_keys_are_validated_and_left_out_of_default_dumps():
    dumped = _cfg().model_dump(mode="json")["train"]
    assert "streams" not in dumped and "seeds" not in dumped  # old hashes and checkpoints compare as before
    assert _cfg(streams="shared").model_dump(mode="json")["train"]["streams"] == "shared"
    assert _cfg(seeds={"data": 3}).train.stream_seed("data") == 3
    assert _cfg(seeds={"data": 3}).train.stream_seed("init") == 7
    with pytest.raises(ConfigError, match="train.seeds.*needs train.streams crn") as err:
        _cfg(streams="shared", seeds={"data": 1})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="train.seeds.eval: unknown key"):
        _cfg(seeds={"eval": 1})
    with pytest.raises(ConfigError, match="train.streams"):
        _cfg(streams="independent")


def test_a_config_saved_before_the_streams_loads(tmp_path):
    saved = _cfg().model_dump(mode="json")
    for key in ("streams", "seeds"):
        saved["train"].pop(key, None)
    cfg = parse_run_config(upgrade_saved_config(saved))
    assert cfg.train.streams == "crn" and cfg.train.seeds is None


def test_a_shared_stream_run_resumes_exactly(tmp_path):
    def cfg(steps):
        return _cfg(K3, steps=steps, streams="shared", eval_every=2, time_sampler="adaptive", adaptive_refresh=1)

    straight = Trainer(cfg(4), tmp_path / "a")
    straight.fit()
    first = Trainer(cfg(2), tmp_path / "b")
    first.fit()
    resumed = Trainer(cfg(4), tmp_path / "b")
    resumed.fit(resume=True)
    for pa, pb in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(straight.process.Q, resumed.process.Q)


def test_a_checkpoint_of_an_earlier_version_resumes(tmp_path, caplog):
    """A checkpoint written before the streams were set apart (one noise generator, no deq, time
    or aux states) resumes: those generators start from (their seed, step), and the log says so."""
    Trainer(_cfg(K3, steps=2, eval_every=2), tmp_path).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("deq", "time", "aux"):
        del state["rng"][key]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    tr = Trainer(_cfg(K3, steps=4, eval_every=2), tmp_path)
    with caplog.at_level(logging.WARNING, logger="mdmsearch.training.state"):
        assert tr.try_resume() and tr.step == 2
    assert "no 'time' generator" in caplog.text
    again = Trainer(_cfg(K3, steps=4, eval_every=2), tmp_path)
    again.try_resume()
    assert torch.equal(again.time_gen.get_state(), tr.time_gen.get_state())  # reproducible
    tr.fit()
    assert tr.step == 4


def test_weights_by_name_keep_zero_layers_and_refuse_a_layer_they_cannot_draw(tmp_path):
    """Zero-initialized layers (the U-Net's output and each residual branch's last convolution)
    stay zero; a layer with parameters but no reset_parameters is one clear error."""
    from mdmsearch.nets import init_by_name

    net = Trainer(_cfg(K3), tmp_path).net
    zero = [n for n, m in net.named_modules() if n == "conv_out" or n.endswith(".conv2")]
    assert len(zero) > 4
    assert all(not p.any() for n in zero for p in net.get_submodule(n).parameters())

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="layer 'scale' .*no reset_parameters"):
        init_by_name(torch.nn.ModuleDict({"scale": Scale()}), 0)
