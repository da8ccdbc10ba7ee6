"""Score (noise-prediction) networks for MDM states z [B, n, *data_shape].

Use :func:`build_network` with a registered name (``mlp``, ``unet``) and a size
preset (``tiny``, ``small``, ``paper``); see :mod:`mdmsearch.nets.presets`.
"""

from mdmsearch.nets.embeddings import prepare_time, sinusoidal_embedding
from mdmsearch.nets.init import init_by_name, named_seed
from mdmsearch.nets.presets import MLP_PRESETS, NETWORK_PRESETS, UNET_PRESETS
from mdmsearch.nets.registry import (
    NETWORKS,
    available_networks,
    available_sizes,
    build_network,
    count_parameters,
    get_preset,
    register_network,
)
from mdmsearch.nets.mlp import MLPScoreNet  # noqa: E402  (registers "mlp")
from mdmsearch.nets.unet import UNetScoreNet  # noqa: E402  (registers "unet")

__all__ = [
    "MLP_PRESETS",
    "MLPScoreNet",
    "NETWORKS",
    "NETWORK_PRESETS",
    "UNET_PRESETS",
    "UNetScoreNet",
    "available_networks",
    "available_sizes",
    "build_network",
    "count_parameters",
    "get_preset",
    "init_by_name",
    "named_seed",
    "prepare_time",
    "register_network",
    "sinusoidal_embedding",
]
