"""Dataset registry: ``load_dataset(name, ...) -> DataBundle`` with fixed, seeded splits.

Registered datasets: ``gaussian``, ``checkerboard``, ``moons``, ``8gaussians``
(generated), ``digits`` (bundled with scikit-learn), ``mnist``, ``cifar10`` and
``imagenet32`` (files under ``data_dir``, default ``$MDMSEARCH_DATA`` or
``~/.cache/mdmsearch/data``). Image data stay integer pixels (``uint8``) with
``levels`` set; the diffusion side dequantizes them.  ``load_from_config(cfg)`` loads the
dataset a run's ``data`` section names; ``load_cached(cfg)`` keeps it for the process.
"""

from mdmsearch.data.base import (
    DATA_DIR_ENV,
    CorruptDatasetError,
    DataBundle,
    DatasetRequest,
    DatasetUnavailableError,
    default_data_dir,
)
from mdmsearch.data.cache import clear_cache, load_cached, load_from_config
from mdmsearch.data.grid import save_image_grid, save_scatter
from mdmsearch.data.idx import read_idx, write_idx
from mdmsearch.data.registry import (
    DATASETS,
    DatasetEntry,
    available_datasets,
    load_dataset,
    register_dataset,
)

# Importing the loader modules registers their datasets.
from mdmsearch.data import images as _images  # noqa: E402,F401
from mdmsearch.data import synthetic as _synthetic  # noqa: E402,F401

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "CorruptDatasetError",
    "DataBundle",
    "DatasetEntry",
    "DatasetRequest",
    "DatasetUnavailableError",
    "available_datasets",
    "clear_cache",
    "default_data_dir",
    "load_cached",
    "load_dataset",
    "load_from_config",
    "read_idx",
    "register_dataset",
    "save_image_grid",
    "save_scatter",
    "write_idx",
]
