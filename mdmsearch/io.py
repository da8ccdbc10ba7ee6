"""Atomic file writes: a crash never leaves a half-written file.

Generic I/O shared by training (checkpoints, run artifacts), the search (plans, leaderboard
rows) and the Parquet leaderboard.  Imports neither torch nor pandas: tensors are recognised
only once torch is loaded, and data frames are duck-typed (``frame.to_parquet``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "write_parquet_atomic",
           "set_aside"]


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
    """``data`` as the whole content of ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys (tensors as lists, paths as strings), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    """JSON fallback for torch tensors (nested lists) and paths (strings); anything else is an error."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is loaded: no import here
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_parquet_atomic(frame: Any, path: str | Path) -> None:
    """A pandas DataFrame as a Parquet file (pyarrow), atomically."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False))


def set_aside(path: str | Path, why: str) -> Path:
    """Rename a damaged file to ``<name>.corrupt-<time>`` (kept for inspection, never read again)."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    log.warning("%s cannot be loaded (%s): moved aside to %s", path, why, dest.name)
    return dest
