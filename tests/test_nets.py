"""Tests for mdmsearch.nets: registry, presets, MLP and U-Net score networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mdmsearch.nets import (
    NETWORK_PRESETS,
    NETWORKS,
    available_networks,
    available_sizes,
    build_network,
    count_parameters,
    get_preset,
    register_network,
    sinusoidal_embedding,
)

SIZES = ("tiny", "small", "paper")


def _perturb_(net: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers stop masking signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def _tiny(name: str, n: int, data_shape: tuple[int, ...], **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_network(name, n_vars=n, data_shape=data_shape, size="tiny", **kw)


# Small but structurally complete configurations used by the behavioural tests.
CASES = [
    ("mlp", 3, (2,)),
    ("unet", 3, (1, 8, 8)),
]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mlp_output_shape_vector_data(n):
    net = _tiny("mlp", n, (2,))
    z = torch.randn(5, n, 2)
    out = net(z, torch.rand(5))
    assert out.shape == z.shape


def test_mlp_accepts_image_shape_by_flattening():
    net = _tiny("mlp", 2, (1, 8, 8))
    z = torch.randn(3, 2, 1, 8, 8)
    assert net(z, torch.rand(3)).shape == z.shape


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("data_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_unet_output_shape(n, data_shape):
    net = _tiny("unet", n, data_shape)
    z = torch.randn(2, n, *data_shape)
    with torch.no_grad():
        out = net(z, torch.rand(2))
    assert out.shape == z.shape


@pytest.mark.parametrize("data_shape", [(1, 28, 28), (2, 15, 9)])
def test_unet_odd_sizes_deep(data_shape):
    # 28 -> 14 -> 7 -> 4 and non-square odd sizes: up path must match the skips.
    net = _tiny(
        "unet", 2, data_shape, channel_mult=(1, 2, 2, 2), attn_resolutions=(7, 4), num_res_blocks=1
    )
    assert len(net.level_sizes) == 4
    z = torch.randn(2, 2, *data_shape)
    with torch.no_grad():
        assert net(z, torch.rand(2)).shape == z.shape


def test_unet_attention_levels_follow_resolution():
    digits = _tiny("unet", 2, (1, 8, 8))  # levels 8, 4; tiny preset: attention at 4
    assert digits.level_sizes == ((8, 8), (4, 4))
    assert digits.attn_levels == (1,)
    mnist = _tiny("unet", 2, (1, 28, 28), attn_resolutions=())
    assert mnist.attn_levels == ()


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_wrong_input_shape_raises(name, n, data_shape):
    net = _tiny(name, n, data_shape)
    with pytest.raises(ValueError):
        net(torch.randn(2, n + 1, *data_shape), torch.rand(2))


# ------------------------------------------------------------------ init and gradients


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_zero_init_output(name, n, data_shape):
    net = _tiny(name, n, data_shape)
    out = net(torch.randn(4, n, *data_shape), torch.rand(4))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_gradients_reach_every_parameter(name, n, data_shape):
    net = _perturb_(_tiny(name, n, data_shape))
    z = torch.randn(4, n, *data_shape)
    loss = (net(z, torch.rand(4)) - z).pow(2).mean()
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"zero gradient for {pname}"


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_training_step_moves_zero_init_output(name, n, data_shape):
    # Without perturbation: one optimizer step must make the output non-zero.
    net = _tiny(name, n, data_shape)
    z = torch.randn(8, n, *data_shape)
    t = torch.rand(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(z, t) - z).pow(2).mean().backward()
    opt.step()
    assert net(z, t).abs().sum() > 0


# ----------------------------------------------------------------------- dependencies


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_output_depends_on_time(name, n, data_shape):
    net = _perturb_(_tiny(name, n, data_shape)).eval()
    z = torch.randn(4, n, *data_shape)
    with torch.no_grad():
        out_a = net(z, torch.full((4,), 0.1))
        out_b = net(z, torch.full((4,), 0.7))
    assert not torch.allclose(out_a, out_b, atol=1e-6)


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_output_depends_on_every_variable(name, n, data_shape):
    net = _perturb_(_tiny(name, n, data_shape)).eval()
    z = torch.randn(4, n, *data_shape)
    t = torch.rand(4)
    with torch.no_grad():
        base = net(z, t)
        for i in range(n):
            z_pert = z.clone()
            z_pert[:, i] += 1.0
            out = net(z_pert, t)
            # Cross-variable: the data-variable output (index 0) sees aux variable i.
            assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-6), f"variable {i} ignored"


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_scalar_time_broadcasts(name, n, data_shape):
    net = _perturb_(_tiny(name, n, data_shape)).eval()
    z = torch.randn(3, n, *data_shape)
    with torch.no_grad():
        ref = net(z, torch.full((3,), 0.3))
        torch.testing.assert_close(net(z, 0.3), ref)
        torch.testing.assert_close(net(z, torch.tensor(0.3)), ref)


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_samples_do_not_interact(name, n, data_shape):
    # eval mode: each sample's output depends only on that sample (no batch mixing).
    net = _perturb_(_tiny(name, n, data_shape)).eval()
    z = torch.randn(4, n, *data_shape)
    t = torch.rand(4)
    with torch.no_grad():
        full = net(z, t)
        single = net(z[2:3], t[2:3])
    torch.testing.assert_close(full[2:3], single, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- embeddings


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = sinusoidal_embedding(t, 16)
    assert emb.shape == (3, 16)
    # t = 0 -> sin = 0, cos = 1
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    assert emb.abs().max() <= 1.0 + 1e-6
    assert not torch.allclose(emb[1], emb[2])
    assert sinusoidal_embedding(t, 7).shape == (3, 7)


# ------------------------------------------------------------------------ registry


def test_registry_lists_networks_and_presets():
    assert {"mlp", "unet"} <= set(available_networks())
    for name in ("mlp", "unet"):
        assert set(SIZES) <= set(available_sizes(name))
        for size in SIZES:
            assert get_preset(name, size)


def test_preset_values_match_spec():
    tiny = get_preset("unet", "tiny")
    assert tiny["base_channels"] == 8 and tuple(tiny["channel_mult"]) == (1, 2)
    assert tiny["num_res_blocks"] == 1
    paper = get_preset("unet", "paper")
    assert paper["base_channels"] == 128 and tuple(paper["channel_mult"]) == (1, 2, 2, 2)
    assert paper["dropout"] == pytest.approx(0.1)
    assert [(get_preset("mlp", s)["hidden_dim"], get_preset("mlp", s)["num_layers"]) for s in SIZES] == [
        (64, 2),
        (256, 3),
        (512, 4),
    ]


def test_unknown_network_raises():
    with pytest.raises(ValueError, match="nope") as info:
        build_network("nope", n_vars=2, data_shape=(2,))
    assert "unet" in str(info.value)


def test_unknown_size_raises():
    with pytest.raises(ValueError, match="huge") as info:
        build_network("mlp", n_vars=2, data_shape=(2,), size="huge")
    assert "tiny" in str(info.value)


def test_unknown_override_raises():
    with pytest.raises(ValueError, match="bogus_key"):
        build_network("unet", n_vars=2, data_shape=(1, 8, 8), bogus_key=3)


def test_overrides_apply():
    base = build_network("mlp", n_vars=2, data_shape=(2,))
    wide = build_network("mlp", n_vars=2, data_shape=(2,), hidden_dim=128)
    assert wide.config["hidden_dim"] == 128 and wide.config["size"] == "tiny"
    assert count_parameters(wide) > count_parameters(base)
    unet = build_network("unet", n_vars=2, data_shape=(1, 8, 8), base_channels=16)
    assert unet.conv_in.out_channels == 16


def test_get_preset_returns_copy():
    get_preset("mlp", "tiny")["hidden_dim"] = -1
    assert get_preset("mlp", "tiny")["hidden_dim"] == 64


def test_register_custom_network():
    name = "_test_linear"

    @register_network(name, presets={"tiny": {"scale": 1.0}, "small": {"scale": 2.0}})
    class _Linear(nn.Module):
        def __init__(self, *, n_vars, data_shape, scale):
            super().__init__()
            self.scale = scale
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, z, t):
            return self.scale * self.w * z

    try:
        net = build_network(name, n_vars=2, data_shape=(2,), size="small")
        assert net.scale == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_network(name, presets={"tiny": {}})(type("Other", (nn.Module,), {}))
    finally:
        NETWORKS.pop(name, None)
        NETWORK_PRESETS.pop(name, None)
    assert name not in available_networks()


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 4)) == 16
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    frozen[0].requires_grad_(False)
    assert count_parameters(frozen) == 21
    assert count_parameters(frozen, trainable_only=True) == 5


def test_unet_parameter_counts_plausible():
    small = build_network("unet", n_vars=4, data_shape=(1, 28, 28), size="small")
    assert 1_000_000 <= count_parameters(small) <= 3_000_000
    paper = build_network("unet", n_vars=2, data_shape=(3, 32, 32), size="paper")
    assert 30_000_000 <= count_parameters(paper) <= 40_000_000  # DDPM CIFAR10: 35.7M


# --------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name,n,data_shape", CASES)
def test_same_seed_same_init(name, n, data_shape):
    def state(seed):
        torch.manual_seed(seed)
        return build_network(name, n_vars=n, data_shape=data_shape).state_dict()

    a, b, c = state(1), state(1), state(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_group_norm_groups_keep_several_channels():
    # One channel per group would cancel the additive time embedding (see ResBlock).
    from mdmsearch.nets.unet import num_groups_for

    for ch in (8, 16, 24, 32, 48, 64, 96, 128, 256, 384):
        g = num_groups_for(ch)
        assert ch % g == 0 and 1 <= g <= 32 and ch // g >= 4
    assert num_groups_for(128) == 32
