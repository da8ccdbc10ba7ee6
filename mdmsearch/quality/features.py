"""Feature extractors by name: ``classifier`` (a small CNN trained on the dataset's own training
split), ``inception`` (Inception-v3 pool3, optional extra) and ``auto`` (by channel count).

An extractor is a callable ``extractor(pixels int [N, C, H, W]) -> float64 [N, d]`` with a
``name`` (the feature space: scores are comparable only under the same name) and ``accuracy``
(the classifier's held-out accuracy, or None).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from mdmsearch.data.base import DataBundle
from mdmsearch.quality.base import QualityError, check_image_data
from mdmsearch.quality.classifier import get_classifier
from mdmsearch.quality.inception import get_inception

__all__ = ["FeatureExtractor", "EXTRACTORS", "AUTO_BY_CHANNELS", "register_extractor", "get_extractor"]


class FeatureExtractor(Protocol):
    name: str
    accuracy: float | None

    def __call__(self, pixels: torch.Tensor) -> np.ndarray: ...


ExtractorFactory = Callable[[DataBundle], FeatureExtractor]
EXTRACTORS: dict[str, ExtractorFactory] = {}
AUTO_BY_CHANNELS = {1: "classifier", 3: "inception"}  # what ``auto`` picks per channel count


def register_extractor(name: str) -> Callable[[ExtractorFactory], ExtractorFactory]:
    """Decorator: ``factory(bundle) -> extractor`` under ``name``."""
    def decorator(fn: ExtractorFactory) -> ExtractorFactory:
        EXTRACTORS[name] = fn
        return fn
    return decorator


@register_extractor("classifier")
def _classifier(data: DataBundle) -> FeatureExtractor:
    return get_classifier(data)


@register_extractor("inception")
def _inception(data: DataBundle) -> FeatureExtractor:
    return get_inception(check_image_data(data))


@register_extractor("auto")
def _auto(data: DataBundle) -> FeatureExtractor:
    check_image_data(data)
    choice = AUTO_BY_CHANNELS.get(data.shape[0])
    if choice is None:
        raise QualityError(f"features='auto' has no choice for {data.shape[0]}-channel images ({data.name!r}); "
                           f"pick one of {', '.join(sorted(set(EXTRACTORS) - {'auto'}))}")
    return EXTRACTORS[choice](data)


def get_extractor(name: str, data: DataBundle) -> FeatureExtractor:
    """The extractor ``name`` for ``data`` (trained / loaded on first use, then kept in memory)."""
    factory = EXTRACTORS.get(name)
    if factory is None:
        raise QualityError(f"unknown features {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    return factory(data)
