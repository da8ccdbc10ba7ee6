"""Registry and factory for score (noise-prediction) networks.

A score network maps an MDM state ``z`` of shape [B, n, *data_shape] and times
``t`` of shape [B] to ``eps_hat`` with exactly the shape of ``z``.  Networks are
classes registered with :func:`register_network`; their constructor signature is
``cls(*, n_vars, data_shape, **config)`` where ``config`` keys are the preset keys
of :mod:`mdmsearch.nets.presets`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from mdmsearch.nets.presets import NETWORK_PRESETS

logger = logging.getLogger(__name__)

NETWORKS: dict[str, type[nn.Module]] = {}


def register_network(
    name: str, *, presets: dict[str, dict[str, Any]] | None = None
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a network under ``name``.

    Size presets are taken from ``presets`` if given (and then stored in
    :data:`NETWORK_PRESETS`), otherwise from ``NETWORK_PRESETS[name]``.
    """

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        table = presets if presets is not None else NETWORK_PRESETS.get(name)
        if not table:
            raise ValueError(f"register_network: no size presets for network {name!r}")
        key_sets = {size: frozenset(cfg) for size, cfg in table.items()}
        first = next(iter(key_sets.values()))
        for size, keys in key_sets.items():
            if keys != first:
                raise ValueError(
                    f"register_network: presets of {name!r} disagree on keys "
                    f"(size {size!r}: {sorted(keys ^ first)})"
                )
        existing = NETWORKS.get(name)
        if existing is not None and existing is not cls:
            same_origin = (existing.__module__, existing.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            )
            if not same_origin:
                raise ValueError(
                    f"register_network: name {name!r} already registered to "
                    f"{existing.__module__}.{existing.__qualname__}"
                )
            logger.debug("re-registering network %r (module reload)", name)
        NETWORK_PRESETS[name] = table
        NETWORKS[name] = cls
        return cls

    return decorator


def available_networks() -> list[str]:
    """Sorted names of the registered networks."""
    return sorted(NETWORKS)


def available_sizes(name: str) -> list[str]:
    """Size preset names of network ``name``."""
    _check_name(name)
    return list(NETWORK_PRESETS[name])


def get_preset(name: str, size: str = "tiny") -> dict[str, Any]:
    """A deep copy of the config dict of network ``name`` at ``size``."""
    _check_name(name)
    table = NETWORK_PRESETS[name]
    if size not in table:
        raise ValueError(
            f"Unknown size {size!r} for network {name!r}; options: {list(table)}"
        )
    return copy.deepcopy(table[size])


def build_network(
    name: str,
    *,
    n_vars: int,
    data_shape: tuple[int, ...],
    size: str = "tiny",
    **overrides: Any,
) -> nn.Module:
    """Build network ``name`` for states [B, n_vars, *data_shape].

    Args:
        name: a registered network (see :func:`available_networks`).
        n_vars: number of MDM variables n = K + 1.
        data_shape: shape of one data point, e.g. (2,) or (C, H, W).
        size: size preset name (see :func:`available_sizes`).
        **overrides: values replacing preset fields; unknown keys raise ValueError.

    The returned module has a ``config`` attribute (dict) recording name, size,
    n_vars, data_shape and the resolved hyper-parameters.
    """
    config = get_preset(name, size)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"Unknown override(s) {unknown} for network {name!r}; valid keys: {sorted(config)}"
        )
    config.update(overrides)
    n_vars = int(n_vars)
    if n_vars < 1:
        raise ValueError(f"n_vars must be >= 1, got {n_vars}")
    data_shape = tuple(int(s) for s in data_shape)
    if not data_shape or any(s < 1 for s in data_shape):
        raise ValueError(f"data_shape must be non-empty with positive sizes, got {data_shape}")
    net = NETWORKS[name](n_vars=n_vars, data_shape=data_shape, **config)
    net.config = {"name": name, "size": size, "n_vars": n_vars, "data_shape": data_shape, **config}
    logger.debug(
        "built network %s (size=%s, n_vars=%d, data_shape=%s): %d parameters",
        name,
        size,
        n_vars,
        data_shape,
        count_parameters(net),
    )
    return net


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (optionally only those requiring grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_name(name: str) -> None:
    if name not in NETWORKS:
        raise ValueError(f"Unknown network {name!r}; options: {available_networks()}")
