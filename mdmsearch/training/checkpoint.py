"""Atomic checkpoint and file writes: a crash never leaves a half-written file."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` into a temp file beside ``path``, fsync, then rename over ``path``:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, atomically.  Serialized in memory first, so that a failed write (disk full,
    file size limit) is an OSError with its errno rather than torch's generic RuntimeError."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getbuffer())


# what torch.load raises on a truncated or overwritten file
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile)


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint file holds, or None if it is missing or unreadable."""
    try:
        return int(load_checkpoint(path, map_location="cpu")["step"])
    except (OSError, KeyError, TypeError, *UNREADABLE):
        return None


def set_aside(path: str | Path, why: str) -> Path:
    """Rename a damaged file to ``<name>.corrupt-<time>`` (kept for inspection, never read again)."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    log.warning("%s cannot be loaded (%s): moved aside to %s", path, why, dest.name)
    return dest


def write_parquet_atomic(frame, path: str | Path) -> None:
    """A pandas DataFrame as a Parquet file (pyarrow), atomically."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False))
