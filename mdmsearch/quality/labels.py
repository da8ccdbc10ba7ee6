"""Class labels for the splits of an image DataBundle, which keeps only pixels.

A bundle's splits are seeded shuffles of the original files, so labels are recovered by
content: each dataset with known labels registers a *label source* returning the original
(images, labels) pool, and every row of a split is looked up by its pixel bytes. A bundle can
also carry its own labels as ``meta["labels"] = {"train": LongTensor[N], ...}``, which wins.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mdmsearch.data.base import SPLITS, DataBundle
from mdmsearch.quality.base import QualityError

__all__ = ["LABEL_SOURCES", "register_label_source", "split_labels", "has_labels"]

logger = logging.getLogger(__name__)

# source(bundle) -> (images uint8 [K, C, H, W], labels int64 [K]): the labelled pool the splits come from
LabelSource = Callable[[DataBundle], tuple[torch.Tensor, torch.Tensor]]
LABEL_SOURCES: dict[str, LabelSource] = {}

_TABLES: dict[tuple, dict[bytes, int]] = {}  # (dataset, files) -> pixel bytes -> label


def register_label_source(name: str) -> Callable[[LabelSource], LabelSource]:
    """Decorator: ``source(bundle) -> (images, labels)`` provides labels for dataset ``name``."""
    def decorator(fn: LabelSource) -> LabelSource:
        LABEL_SOURCES[name.strip().lower()] = fn
        return fn
    return decorator


@register_label_source("digits")
def _digits(data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8]
    return images, torch.from_numpy(raw.target.astype(np.int64))  # [1797]


def _mnist_pairs(files: list[str]) -> list[tuple[Path, Path]]:
    """(images, labels) IDX file pairs among the files the mnist loader recorded in ``meta``."""
    from mdmsearch.data.images import MNIST_FILES

    paths = [Path(f) for f in files]
    pairs = []
    for images_stem, labels_stem in MNIST_FILES.values():
        images = [p for p in paths if p.name.startswith(images_stem)]
        labels = [p for p in paths if p.name.startswith(labels_stem)]
        if images and not labels:
            raise QualityError(f"mnist: no labels file {labels_stem}[.gz] next to {images[0]}; "
                               "the classifier features need the labels")
        if images:
            pairs.append((images[0], labels[0]))
    return pairs


@register_label_source("mnist")
def _mnist(data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    from mdmsearch.data.idx import read_idx

    pairs = _mnist_pairs(list(data.meta.get("files", [])))
    if not pairs:
        raise QualityError("mnist: the bundle does not record its IDX files (meta['files']); cannot find labels")
    images = [torch.from_numpy(read_idx(i, ndim=3)).unsqueeze(1) for i, _ in pairs]  # [K, 1, 28, 28] each
    labels = [torch.from_numpy(read_idx(lab, ndim=1).astype(np.int64)) for _, lab in pairs]  # [K] each
    return torch.cat(images), torch.cat(labels)


def _table(data: DataBundle) -> dict[bytes, int]:
    """Pixel bytes -> label for ``data``'s dataset, built once per (dataset, files)."""
    key = (data.name, tuple(data.meta.get("files", ())))
    if key not in _TABLES:
        source = LABEL_SOURCES.get(data.name)
        if source is None:
            raise QualityError(
                f"no labels known for dataset {data.name!r} (label sources: {', '.join(sorted(LABEL_SOURCES))}); "
                "the classifier features need them: put meta['labels'] in the bundle, register a label source "
                "(mdmsearch.quality.register_label_source) or use features='inception'"
            )
        images, labels = source(data)
        _TABLES[key] = _lookup_table(data.name, images, labels)
    return _TABLES[key]


def _lookup_table(name: str, images: torch.Tensor, labels: torch.Tensor) -> dict[bytes, int]:
    """Pixel bytes -> label; an image listed with different labels gets its most common one."""
    votes: dict[bytes, Counter] = {}
    for row, y in zip(images.contiguous().numpy(), labels.tolist()):
        votes.setdefault(row.tobytes(), Counter())[int(y)] += 1
    ambiguous = sum(len(c) > 1 for c in votes.values())
    if ambiguous:
        logger.warning("%s: %d images appear with more than one label; using the most common one", name, ambiguous)
    return {k: c.most_common(1)[0][0] for k, c in votes.items()}


def split_labels(data: DataBundle, split: str) -> torch.Tensor:
    """Labels (int64 [N]) of split ``split`` of ``data``; one-line error when they are unknown."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    x = data.split(split)  # [N, C, H, W] uint8
    given = data.meta.get("labels")
    if given is not None and split in given:
        y = torch.as_tensor(given[split], dtype=torch.int64)
        if y.shape != (x.shape[0],):
            raise QualityError(f"{data.name}: meta['labels'][{split!r}] has shape {tuple(y.shape)}, "
                               f"expected ({x.shape[0]},)")
        return y
    table = _table(data)
    rows = x.contiguous().numpy()
    found = [table.get(r.tobytes(), -1) for r in rows]
    missing = found.count(-1)
    if missing:
        raise QualityError(f"{data.name}: {missing} of {len(found)} {split} images are not in the labelled "
                           "source data (a modified bundle?); cannot train the classifier on them")
    return torch.tensor(found, dtype=torch.int64)


def has_labels(data: DataBundle) -> bool:
    """True when labels for ``data`` can be looked for (own ``meta['labels']`` or a label source)."""
    return data.meta.get("labels") is not None or data.name in LABEL_SOURCES
