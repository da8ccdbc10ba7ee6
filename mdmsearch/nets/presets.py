"""Size presets for every registered score network, kept in one place.

Each network maps a size name (``tiny``, ``small``, ``paper``) to a dict of
constructor keyword arguments.  All sizes of one network must define the same
keys; ``build_network(..., **overrides)`` may override any of them and rejects
keys that are not listed here.

Attention resolutions are spatial side lengths (``min(H, W)`` of a U-Net level).
Both ``14`` and ``16`` are listed where attention is wanted on the second level,
so the same preset does the right thing for MNIST (28 -> 14 -> 7) and
CIFAR10 / ImageNet32 (32 -> 16 -> 8).
"""

from __future__ import annotations

from typing import Any

MLP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_dim": 64,
        "num_layers": 2,
        "time_embed_dim": 32,
        "layer_norm": False,
        "dropout": 0.0,
        "time_scale": 1000.0,
    },
    "small": {
        "hidden_dim": 256,
        "num_layers": 3,
        "time_embed_dim": 64,
        "layer_norm": False,
        "dropout": 0.0,
        "time_scale": 1000.0,
    },
    "paper": {
        "hidden_dim": 512,
        "num_layers": 4,
        "time_embed_dim": 128,
        "layer_norm": True,
        "dropout": 0.0,
        "time_scale": 1000.0,
    },
}

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Digits (1x8x8): levels 8 -> 4, attention at 4 and in the middle block.
    "tiny": {
        "base_channels": 8,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attn_resolutions": (4,),
        "mid_attention": True,
        "num_heads": 1,
        "dropout": 0.0,
        "max_groups": 32,
        "time_scale": 1000.0,
    },
    # MNIST paper-like size (28 -> 14 -> 7), ~1.5-2M parameters.
    "small": {
        "base_channels": 32,
        "channel_mult": (1, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (14, 16),
        "mid_attention": True,
        "num_heads": 1,
        "dropout": 0.1,
        "max_groups": 32,
        "time_scale": 1000.0,
    },
    # DDPM CIFAR10 / ImageNet32 size (32 -> 16 -> 8 -> 4), ~35.7M parameters.
    "paper": {
        "base_channels": 128,
        "channel_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (14, 16),
        "mid_attention": True,
        "num_heads": 1,
        "dropout": 0.1,
        "max_groups": 32,
        "time_scale": 1000.0,
    },
}

NETWORK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": MLP_PRESETS,
    "unet": UNET_PRESETS,
}
