"""Core types of the dataset registry: the loaded bundle, the errors, seeded splits.

Conventions used throughout ``mdmsearch.data``:

* Image datasets keep their *integer* pixels as ``uint8`` tensors of shape
  ``[N, C, H, W]`` together with ``levels`` (the number of pixel values). The
  diffusion side dequantizes / logit-transforms them; nothing here rescales.
* Continuous datasets are ``float32`` tensors of shape ``[N, *shape]`` and have
  ``levels = None``.
* Every split is a pure function of the seed: same seed -> same split.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from mdmsearch.errors import MDMError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "MDMSEARCH_DATA"
SPLITS = ("train", "val", "test")


class DatasetUnavailableError(MDMError, RuntimeError):
    """A dataset's files are absent (and could not be downloaded); one readable line."""


class CorruptDatasetError(DatasetUnavailableError):
    """A dataset file exists but cannot be parsed (bad magic number, truncated, ...)."""


def default_data_dir() -> Path:
    """``$MDMSEARCH_DATA`` if set, else ``~/.cache/mdmsearch/data`` (read at call time)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mdmsearch" / "data"


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A loaded dataset: three fixed splits plus what a model needs to know about them.

    ``train``/``val``/``test`` are ``[N_split, *shape]`` tensors: ``uint8`` integer
    pixels in ``[0, levels - 1]`` when ``levels`` is set, ``float32`` otherwise.
    ``meta`` holds dataset-specific facts (e.g. ``mu``/``var`` of ``gaussian``).
    """

    name: str
    shape: tuple[int, ...]
    levels: int | None
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        expected_dtype = torch.uint8 if self.levels is not None else torch.float32
        if self.levels is not None and not 2 <= self.levels <= 256:
            raise ValueError(f"{self.name}: levels must be in [2, 256], got {self.levels}")
        for split in SPLITS:
            x = getattr(self, split)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{self.name}.{split}: expected a torch.Tensor, got {type(x)}")
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(
                    f"{self.name}.{split}: per-example shape {tuple(x.shape[1:])} != {self.shape}"
                )
            if x.dtype != expected_dtype:
                raise TypeError(f"{self.name}.{split}: dtype {x.dtype}, expected {expected_dtype}")

    @property
    def dim(self) -> int:
        """Number of scalar dimensions per example, prod(shape)."""
        return math.prod(self.shape)

    @property
    def is_discrete(self) -> bool:
        """True for quantized (image) data with a known number of levels."""
        return self.levels is not None

    def split(self, name: str) -> torch.Tensor:
        """The tensor of split ``name`` (one of ``train``, ``val``, ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {s: int(getattr(self, s).shape[0]) for s in SPLITS}

    def __repr__(self) -> str:
        return (
            f"DataBundle(name={self.name!r}, shape={self.shape}, levels={self.levels}, "
            f"sizes={self.sizes()})"
        )


@dataclass(frozen=True)
class DatasetRequest:
    """What the caller asked for; handed to every registered loader.

    ``n_train``/``n_val``/``n_test`` are ``None`` (loader default) or a size: for
    generated data they are the sizes to draw, for file-backed data caps (or the
    partition sizes when a split has to be carved out of another one).
    """

    data_dir: Path
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    download: bool = False

    def __post_init__(self) -> None:
        for split in SPLITS:
            n = getattr(self, f"n_{split}")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"n_{split} must be a positive int or None, got {n!r}")

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed + offset`` (pure: no global RNG)."""
        return torch.Generator().manual_seed(int(self.seed) + offset)


def _cap(x: torch.Tensor, n: int | None) -> torch.Tensor:
    """First ``n`` rows of an already shuffled split (all when ``n`` is None)."""
    return x if n is None else x[:n]


def partition(
    x: torch.Tensor,
    *,
    n_val: int,
    n_test: int,
    n_train: int | None,
    generator: torch.Generator,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle ``x`` [N, ...] once and cut it into disjoint (train, val, test).

    test = perm[:n_test], val = perm[n_test:n_test+n_val], train = the rest,
    capped at ``n_train``.
    """
    n = int(x.shape[0])
    if n_val + n_test >= n:
        raise ValueError(
            f"{name}: cannot carve n_val={n_val} + n_test={n_test} out of {n} examples "
            "and keep any for training"
        )
    perm = torch.randperm(n, generator=generator)  # [N]
    test = x[perm[:n_test]]
    val = x[perm[n_test : n_test + n_val]]
    train = x[perm[n_test + n_val :][:n_train]]  # cap indices first: no full copy
    return train, val, test


def holdout_split(
    train_full: torch.Tensor,
    test_full: torch.Tensor,
    *,
    val_size: int,
    request: DatasetRequest,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official train/test files -> (train minus a seeded val holdout, val, shuffled test).

    The holdout has ``request.n_val`` examples if given, else
    ``min(val_size, 10% of train)``; train and test are then capped by
    ``n_train``/``n_test`` (first rows of the shuffled split).
    """
    n = int(train_full.shape[0])
    n_val = request.n_val if request.n_val is not None else min(val_size, max(1, n // 10))
    if n_val >= n:
        raise ValueError(f"{name}: validation holdout {n_val} >= {n} training examples")
    gen = request.generator()
    perm = torch.randperm(n, generator=gen)  # [N_train_full]
    val = train_full[perm[:n_val]]
    train = train_full[perm[n_val:][: request.n_train]]  # cap indices first: no full copy
    test_perm = torch.randperm(int(test_full.shape[0]), generator=gen)
    test = test_full[test_perm[: request.n_test]]
    return train, val, test


def splits_from_files(
    name: str,
    train_full: torch.Tensor | None,
    test_full: torch.Tensor | None,
    *,
    request: DatasetRequest,
    val_size: int,
    frac: float = 0.1,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], str]:
    """Seeded (train, val, test) from whichever official splits exist, plus a provenance note.

    Both present: :func:`holdout_split`. Only one present: it is shuffled and cut
    into val/test of ``n_val``/``n_test`` examples (default ``frac`` of it each)
    and train = the rest (capped by ``n_train``), with a logged warning.
    """
    if train_full is not None and test_full is not None:
        splits = holdout_split(train_full, test_full, val_size=val_size, request=request, name=name)
        return splits, "official train (minus seeded val holdout) / official test"
    if train_full is None and test_full is None:
        raise ValueError(f"{name}: no split given")
    which, only = ("test", test_full) if train_full is None else ("train", train_full)
    assert only is not None
    n = int(only.shape[0])
    n_val = request.n_val if request.n_val is not None else fraction_size(n, frac)
    n_test = request.n_test if request.n_test is not None else fraction_size(n, frac)
    logger.warning(
        "%s: only the official %s split is available (%d examples); building train/val/test "
        "from it with a seeded split (val=%d, test=%d, train=rest, seed=%d)",
        name, which, n, n_val, n_test, request.seed,
    )
    splits = partition(
        only, n_val=n_val, n_test=n_test, n_train=request.n_train,
        generator=request.generator(), name=name,
    )
    return splits, f"seeded split of the official {which} split only"


def fraction_size(n: int, frac: float) -> int:
    """``round(n * frac)`` but at least 1 (small synthetic files still get every split)."""
    return max(1, round(n * frac))
