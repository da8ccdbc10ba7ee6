"""Feature extractors by name: ``classifier`` (a small CNN trained on the dataset's own training
split), ``inception`` (Inception-v3 pool3, optional extra) and ``auto`` (by channel count).

An extractor is a callable ``extractor(pixels int [N, C, H, W]) -> float64 [N, d]`` with a
``name`` (the feature space: scores are comparable only under the same name) and ``accuracy``
(the classifier's held-out accuracy, or None).  A factory takes the dataset and the device the
run trains on (None: its own choice); Inception runs there, the small classifier on the CPU.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np
import torch

from mdmsearch.data.base import DataBundle
from mdmsearch.quality.base import QualityError, check_image_data
from mdmsearch.quality.classifier import get_classifier
from mdmsearch.quality.inception import check_inception, get_inception

__all__ = ["FeatureExtractor", "EXTRACTORS", "AUTO_BY_CHANNELS", "check_features", "register_extractor", "get_extractor"]


class FeatureExtractor(Protocol):
    name: str
    accuracy: float | None

    def __call__(self, pixels: torch.Tensor) -> np.ndarray: ...


ExtractorFactory = Callable[[DataBundle, Optional[torch.device]], FeatureExtractor]
EXTRACTORS: dict[str, ExtractorFactory] = {}
AUTO_BY_CHANNELS = {1: "classifier", 3: "inception"}  # what ``auto`` picks per channel count


def register_extractor(name: str) -> Callable[[ExtractorFactory], ExtractorFactory]:
    """Decorator: ``factory(bundle, device) -> extractor`` under ``name``."""
    def decorator(fn: ExtractorFactory) -> ExtractorFactory:
        EXTRACTORS[name] = fn
        return fn
    return decorator


@register_extractor("classifier")
def _classifier(data: DataBundle, device: Optional[torch.device] = None) -> FeatureExtractor:
    return get_classifier(data)  # (a small CNN: trained and run on the CPU, cached by content hash)


@register_extractor("inception")
def _inception(data: DataBundle, device: Optional[torch.device] = None) -> FeatureExtractor:
    return get_inception(check_image_data(data), device)


@register_extractor("auto")
def _auto(data: DataBundle, device: Optional[torch.device] = None) -> FeatureExtractor:
    check_image_data(data)
    choice = AUTO_BY_CHANNELS.get(data.shape[0])
    if choice is None:
        raise QualityError(f"features='auto' has no choice for {data.shape[0]}-channel images ({data.name!r}); "
                           f"pick one of {', '.join(sorted(set(EXTRACTORS) - {'auto'}))}")
    return EXTRACTORS[choice](data, device)


def check_features(name: str, channels: Optional[int]) -> str:
    """Before any training: the extractor ``name`` resolves (``auto`` by the data's ``channels``)
    and what it needs is here (Inception: torch-fidelity and the weights file, offline).  Returns
    the resolved name; one-line QualityError otherwise."""
    if name not in EXTRACTORS:
        raise QualityError(f"unknown features {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    resolved = AUTO_BY_CHANNELS.get(channels, name) if name == "auto" else name
    if resolved == "inception":
        check_inception()
    return resolved


def get_extractor(name: str, data: DataBundle, device: Optional[torch.device] = None) -> FeatureExtractor:
    """The extractor ``name`` for ``data`` on ``device`` (the run's; None: CUDA when available),
    trained / loaded on first use, then kept in memory."""
    factory = EXTRACTORS.get(name)
    if factory is None:
        raise QualityError(f"unknown features {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    return factory(data, device)
