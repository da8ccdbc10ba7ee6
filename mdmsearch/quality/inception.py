"""Inception-v3 pool features (2048-d, the FID/KID standard) through torch-fidelity, an optional extra.

Nothing is downloaded here: the weights (torch-fidelity's conversion of the TF 2015-12-05
graph) are looked for in ``$MDMSEARCH_INCEPTION_WEIGHTS``, in ``cache_dir()`` and in torch
hub's checkpoint folder (where torch-fidelity itself stores them). Missing package or weights
-> one-line :class:`QualityError` saying what to install or where to put the file.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from mdmsearch.errors import one_line
from mdmsearch.quality.base import QualityError, cache_dir

__all__ = ["INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "WEIGHTS_ENV", "InceptionFeatures",
           "inception_weights_path", "get_inception"]

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "MDMSEARCH_INCEPTION_WEIGHTS"
EXTRA_HINT = "pip install 'torch-fidelity>=0.3,<0.5' (the mdmsearch[quality] extra)"
_BATCH = 64

_MODELS: dict[tuple[str, str], "InceptionFeatures"] = {}  # (weights path, device) -> extractor


def _candidates() -> list[Path]:
    return [cache_dir() / INCEPTION_WEIGHTS_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE]


def inception_weights_path() -> Path:
    """The local weights file; one-line error naming where to put it when there is none."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise QualityError(f"{WEIGHTS_ENV}={env} is not a file; put {INCEPTION_WEIGHTS_FILE} "
                               f"(from {INCEPTION_WEIGHTS_URL}) there")
        return path
    for path in _candidates():
        if path.is_file():
            return path
    raise QualityError(f"Inception-v3 weights not found (offline; nothing is downloaded): put "
                       f"{INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}) in {_candidates()[0].parent} "
                       f"or set {WEIGHTS_ENV}")


def _import_extractor() -> type:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise QualityError(f"Inception features need torch-fidelity: {EXTRA_HINT} ({one_line(exc)})") from None
    return FeatureExtractorInceptionV3


def check_inception() -> Path:
    """Inception features can be computed here: torch-fidelity imports and the weights file exists
    (checked before a run trains, so that a missing file costs no training); its path."""
    _import_extractor()
    return inception_weights_path()


def _to_rgb255(pixels: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer pixels [B, C, H, W] in [0, levels-1] -> uint8 [B, 3, H, W] in [0, 255] (gray repeated)."""
    x = torch.round(pixels.to(torch.float32) * (255.0 / (levels - 1))).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """Callable: integer pixels [N, C, H, W] -> float64 pool3 features [N, 2048]."""

    name = "inception-v3-pool3"
    accuracy = None

    def __init__(self, net: torch.nn.Module, device: torch.device, levels: int):
        self.net, self.device, self.levels = net, device, levels

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        out = [self.net(_to_rgb255(pixels[i:i + _BATCH], self.levels).to(self.device))[0].cpu()
               for i in range(0, pixels.shape[0], _BATCH)]  # each [B, 2048]
        return torch.cat(out).to(torch.float64).numpy()


def get_inception(levels: int, device: torch.device | str | None = None) -> InceptionFeatures:
    """The Inception-v3 extractor on ``device`` (default: CUDA when available), loaded once per process."""
    cls = _import_extractor()
    path = inception_weights_path()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (str(path), str(dev))
    if key not in _MODELS:
        try:
            net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            raise QualityError(f"cannot load Inception weights {path}: {one_line(exc)}; replace the file with "
                               f"{INCEPTION_WEIGHTS_URL}") from None
        _MODELS[key] = InceptionFeatures(net.to(dev).eval(), dev, levels)
    model = _MODELS[key]
    return model if model.levels == levels else InceptionFeatures(model.net, model.device, levels)
