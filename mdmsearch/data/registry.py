"""Name -> loader registry and the single public entry point ``load_dataset``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mdmsearch.data.base import DataBundle, DatasetRequest, SPLITS, _cap, default_data_dir
from mdmsearch.errors import ConfigError

logger = logging.getLogger(__name__)

Loader = Callable[..., DataBundle]  # loader(request: DatasetRequest, **kwargs) -> DataBundle


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its loader and whether it needs files on disk."""

    name: str
    loader: Loader
    needs_files: bool
    description: str


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str, *, needs_files: bool = False, description: str = ""
) -> Callable[[Loader], Loader]:
    """Decorator: register ``loader(request, **kwargs) -> DataBundle`` under ``name``."""
    key = name.strip().lower()

    def decorator(fn: Loader) -> Loader:
        if key in DATASETS:
            raise ValueError(f"dataset {key!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        DATASETS[key] = DatasetEntry(key, fn, needs_files, description or (doc[0] if doc else ""))
        return fn

    return decorator


def available_datasets() -> list[str]:
    """Sorted names of all registered datasets."""
    return sorted(DATASETS)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    download: bool = False,
    **kwargs: object,
) -> DataBundle:
    """Load dataset ``name`` with fixed, seeded train/val/test splits.

    ``data_dir`` defaults to :func:`default_data_dir`. ``n_*`` cap the splits
    (first rows of the shuffled split) or, for generated data, set their sizes.
    Extra ``kwargs`` go to the dataset's loader (e.g. ``dim``/``mu``/``var`` for
    ``gaussian``). Raises ``ValueError`` (ConfigError) for an unknown name and
    ``DatasetUnavailableError`` when files are missing and cannot be downloaded.
    """
    key = str(name).strip().lower()
    entry = DATASETS.get(key)
    if entry is None:
        raise ConfigError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    request = DatasetRequest(
        data_dir=root, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, download=download
    )
    bundle = entry.loader(request, **kwargs)
    caps = {"train": n_train, "val": n_val, "test": n_test}
    if any(getattr(bundle, s).shape[0] > (caps[s] or float("inf")) for s in SPLITS):
        bundle = DataBundle(
            name=bundle.name,
            shape=bundle.shape,
            levels=bundle.levels,
            train=_cap(bundle.train, n_train),
            val=_cap(bundle.val, n_val),
            test=_cap(bundle.test, n_test),
            meta=bundle.meta,
        )
    for split in SPLITS:
        asked, got = caps[split], getattr(bundle, split).shape[0]
        if asked is not None and got < asked:
            logger.warning("%s: asked for %d %s examples, only %d available", key, asked, split, got)
    logger.info("loaded %r", bundle)
    return bundle
