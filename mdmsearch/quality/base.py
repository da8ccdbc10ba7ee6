"""Shared pieces of the sample-quality module: its error, its cache folder, content hashes
and the checks every public entry point makes on integer pixels."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdmsearch.data.base import DataBundle
from mdmsearch.errors import MDMError

__all__ = ["QualityError", "CACHE_ENV", "cache_dir", "content_hash", "train_hash", "check_image_data",
           "check_pixels"]

CACHE_ENV = "MDMSEARCH_CACHE"

_TRAIN_HASHES: "weakref.WeakKeyDictionary[DataBundle, str]" = weakref.WeakKeyDictionary()


class QualityError(MDMError, RuntimeError):
    """Sample quality cannot be measured (missing extra, weights or labels, bad pixels); one line."""


def cache_dir() -> Path:
    """``$MDMSEARCH_CACHE`` if set, else ``~/.cache/mdmsearch/quality`` (read at call time)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mdmsearch" / "quality"


def _update(h: "hashlib._Hash", part: Any) -> None:
    """Feed one part to ``h``, tagged with its kind so that different kinds never collide."""
    if isinstance(part, torch.Tensor):
        arr = part.detach().cpu().contiguous().numpy()
        h.update(f"tensor:{arr.dtype}:{arr.shape}:".encode())
        h.update(arr.tobytes())
    elif isinstance(part, np.ndarray):
        h.update(f"array:{part.dtype}:{part.shape}:".encode())
        h.update(np.ascontiguousarray(part).tobytes())
    elif isinstance(part, bytes):
        h.update(b"bytes:" + part)
    else:  # JSON-able values (str, numbers, dicts of them)
        h.update(b"json:" + json.dumps(part, sort_keys=True, default=str).encode())
    h.update(b"\x00")


def content_hash(*parts: Any) -> str:
    """SHA-256 hex digest of tensors / arrays / bytes / JSON-able values, in order."""
    h = hashlib.sha256()
    for part in parts:
        _update(h, part)
    return h.hexdigest()


def train_hash(data: DataBundle) -> str:
    """Content hash of ``data``'s training pixels (and levels), computed once per bundle object."""
    cached = _TRAIN_HASHES.get(data)
    if cached is None:
        cached = content_hash(data.name, data.levels, data.train)
        _TRAIN_HASHES[data] = cached
    return cached


def check_image_data(data: DataBundle) -> int:
    """``data.levels`` for an image dataset ([C, H, W] integer pixels); one-line error otherwise."""
    if data.levels is None or len(data.shape) != 3:
        raise QualityError(
            f"sample quality needs an image dataset with integer pixels [C, H, W]; "
            f"{data.name!r} has shape {data.shape} and levels={data.levels}"
        )
    return int(data.levels)


def check_pixels(pixels: torch.Tensor, data: DataBundle, *, min_n: int = 1) -> torch.Tensor:
    """Validate integer pixels [N, C, H, W] in [0, levels-1] for ``data``; returns them as int64 on CPU."""
    levels = check_image_data(data)
    if not isinstance(pixels, torch.Tensor):
        raise QualityError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.dtype.is_floating_point or pixels.dtype.is_complex or pixels.dtype == torch.bool:
        raise QualityError(f"pixels must be integers in [0, {levels - 1}] (e.g. from to_pixels), got {pixels.dtype}")
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != data.shape:
        raise QualityError(f"pixels must be [N, {', '.join(map(str, data.shape))}] for {data.name!r}, "
                           f"got {list(pixels.shape)}")
    if pixels.shape[0] < min_n:
        raise QualityError(f"need at least {min_n} samples to score, got {pixels.shape[0]}")
    x = pixels.detach().cpu().to(torch.int64)  # [N, C, H, W]
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > levels - 1:
        raise QualityError(f"pixels must lie in [0, {levels - 1}] for {data.name!r}, got values in [{lo}, {hi}]")
    return x
