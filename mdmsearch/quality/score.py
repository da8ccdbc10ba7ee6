"""The entry point the trainer calls: KID and FID of generated integer pixels against a fixed,
seeded reference subset of the dataset's training split."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np
import torch

from mdmsearch.data.base import DataBundle
from mdmsearch.quality.base import QualityError, check_image_data, check_pixels, train_hash
from mdmsearch.quality.features import FeatureExtractor, get_extractor
from mdmsearch.quality.metrics import DEFAULT_SUBSET_SIZE, METRICS

__all__ = ["DEFAULT_N_REF", "reference_pixels", "reference_features", "score_samples", "clear_reference_memory"]

logger = logging.getLogger(__name__)

DEFAULT_N_REF = 2000  # reference images when n_ref is None (capped by the training split)
_REF_MEMORY_SIZE = 8
_REF_MEMORY: "OrderedDict[tuple, np.ndarray]" = OrderedDict()  # (features, train hash, n, seed) -> [n, d]


def _n_ref(data: DataBundle, n: int | None) -> int:
    available = int(data.train.shape[0])
    if n is None:
        return min(available, DEFAULT_N_REF)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QualityError(f"n_ref must be a positive int or None, got {n!r}")
    if n > available:
        raise QualityError(f"n_ref={n} exceeds the {available} training images of {data.name!r}")
    return n


def reference_pixels(data: DataBundle, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """A fixed seeded subset of ``data.train``: uint8 [n, C, H, W] (same seed -> same images)."""
    check_image_data(data)
    n = _n_ref(data, n)
    perm = torch.randperm(int(data.train.shape[0]), generator=torch.Generator().manual_seed(int(seed)))
    return data.train[perm[:n]]


def reference_features(extractor: FeatureExtractor, data: DataBundle, n: int | None = None,
                       seed: int = 0) -> np.ndarray:
    """Features [n, d] of :func:`reference_pixels`, kept for the last few (extractor, data, n, seed)."""
    n = _n_ref(data, n)
    key = (extractor.name, train_hash(data), n, int(seed))
    if key in _REF_MEMORY:
        _REF_MEMORY.move_to_end(key)
        return _REF_MEMORY[key]
    feats = extractor(reference_pixels(data, n, seed))
    _REF_MEMORY[key] = feats
    while len(_REF_MEMORY) > _REF_MEMORY_SIZE:
        _REF_MEMORY.popitem(last=False)
    return feats


def clear_reference_memory() -> None:
    """Forget the reference features kept in this process."""
    _REF_MEMORY.clear()


def score_samples(pixels: torch.Tensor, data: DataBundle, *, features: str = "auto", n_ref: int | None = None,
                  seed: int = 0, subsets: int | None = None, subset_size: int = DEFAULT_SUBSET_SIZE,
                  device: torch.device | str | None = None) -> dict:
    """KID (with SE) and FID of generated ``pixels`` against the training reference of ``data``.

    ``pixels``: integer pixels [N, C, H, W] in [0, levels-1] (what ``to_pixels`` returns).
    The reference is :func:`reference_pixels` (``n_ref`` images, default ``min(2000, train)``,
    chosen by ``seed``): two trials scored with the same seed share it (common random numbers).
    ``subsets``/``subset_size``: how KID deals the features into disjoint subsets
    (:func:`mdmsearch.quality.metrics.kid`). Returns a JSON-able dict: kid, kid_se, fid, n, n_ref,
    features (the feature-space name: compare scores only under the same one), classifier_acc,
    seconds.  ``device``: where feature extractors that use one run (the run's device: a CPU run
    scores on the CPU, a cuda:1 run on cuda:1; None: CUDA when available).
    """
    t0 = time.perf_counter()
    x = check_pixels(pixels, data, min_n=4)  # [N, C, H, W] int64
    extractor = get_extractor(features, data, None if device is None else torch.device(device))
    ref = reference_features(extractor, data, n_ref, seed)  # [M, d]
    gen = extractor(x)  # [N, d]
    out: dict = {}
    for metric in METRICS.values():
        out.update(metric(gen, ref, seed=seed, subsets=subsets, subset_size=subset_size))
    out.update(n=int(x.shape[0]), n_ref=int(ref.shape[0]), features=extractor.name,
               classifier_acc=None if extractor.accuracy is None else float(extractor.accuracy),
               seconds=round(time.perf_counter() - t0, 4))
    logger.info("sample quality of %d samples (%s): KID %.4g +- %.2g, FID %.4g",
                out["n"], out["features"], out["kid"], out["kid_se"], out["fid"])
    return out
