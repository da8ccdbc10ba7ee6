"""Datasets named by a run's ``data`` configuration, loaded once per process.

``load_from_config(cfg)`` loads the dataset a :class:`~mdmsearch.config.DataConfig` names
(what a single ``train`` does); ``load_cached(cfg)`` keeps it for the life of the process,
keyed by the whole configuration, so that the trials of a search that a worker runs one
after another, the dry run's timing and the preflight check share one copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdmsearch.data.base import DataBundle
from mdmsearch.data.registry import load_dataset

if TYPE_CHECKING:  # (config imports the registry to validate names: no import cycle at run time)
    from mdmsearch.config import DataConfig

__all__ = ["load_from_config", "load_cached", "clear_cache"]

_CACHE: dict[str, DataBundle] = {}  # DataConfig as JSON -> its bundle


def load_from_config(config: "DataConfig") -> DataBundle:
    """The dataset ``config`` names, with its seeded splits and sizes (not cached)."""
    return load_dataset(config.name, data_dir=config.data_dir, seed=config.seed, n_train=config.n_train,
                        n_val=config.n_val, n_test=config.n_test, download=config.download, **config.options)


def load_cached(config: "DataConfig") -> DataBundle:
    """:func:`load_from_config`, once per distinct configuration in this process."""
    key = config.model_dump_json()
    if key not in _CACHE:
        _CACHE[key] = load_from_config(config)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached dataset (their memory goes once no run holds them)."""
    _CACHE.clear()
