"""Atomic checkpoints: ``torch.save`` through :mod:`mdmsearch.io`, what a damaged one raises, and
whether a checkpoint's configuration allows the current run to resume from it."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from ..io import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_step", "config_mismatch", "UNREADABLE",
           "RESUMABLE_CHANGES"]


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, atomically.  Serialized in memory first, so that a failed write (disk full,
    file size limit) is an OSError with its errno rather than torch's generic RuntimeError."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getbuffer())


# what torch.load raises on a truncated or overwritten file
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile)


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """The state dict in ``path`` (full unpickling: checkpoints are written by this package)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint file holds, or None if it is missing or unreadable."""
    try:
        return int(load_checkpoint(path, map_location="cpu")["step"])
    except (OSError, KeyError, TypeError, *UNREADABLE):
        return None


# train.* keys a resumed run may change: the budget may grow, the progress display is the caller's,
# and the number of processes changes only the order of float sums (their checkpoints are alike)
RESUMABLE_CHANGES = ("steps", "progress", "devices")
_MISSING = object()


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Dotted keys in which a checkpoint's configuration (upgraded to the current schema) and
    the current one differ, apart from :data:`RESUMABLE_CHANGES`: empty when it may resume."""
    def comparable(cfg: dict) -> dict:
        return {**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in RESUMABLE_CHANGES}}

    return _differing_keys(comparable(saved), comparable(current))


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configuration dicts (a key missing
    on one side differs from any value, None included: empty exactly when ``a == b``)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
