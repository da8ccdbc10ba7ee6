"""A small reader/writer for the IDX format of the MNIST files (raw or gzip).

Header: two zero bytes, a dtype code, the number of dimensions ``ndim``, then
``ndim`` big-endian uint32 sizes, then the row-major payload.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from mdmsearch.data.base import CorruptDatasetError

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code for code, dt in _IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptDatasetError(f"corrupted gzip file {path}: {exc}") from exc


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a native-endian numpy array.

    ``ndim`` (if given) is checked against the header (3 for images, 1 for labels).
    Raises ``CorruptDatasetError`` on a bad magic number, dtype, size or a
    truncated payload.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptDatasetError(
            f"corrupted IDX file {path}: bad magic number {data[:4].hex() or '<empty>'}"
        )
    code, file_ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise CorruptDatasetError(f"corrupted IDX file {path}: unknown dtype code 0x{code:02x}")
    if ndim is not None and file_ndim != ndim:
        raise CorruptDatasetError(
            f"corrupted IDX file {path}: expected {ndim} dimensions, header says {file_ndim}"
        )
    header = 4 + 4 * file_ndim
    if len(data) < header:
        raise CorruptDatasetError(f"corrupted IDX file {path}: truncated header")
    dims = struct.unpack(f">{file_ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise CorruptDatasetError(
            f"corrupted IDX file {path}: payload has {len(data) - header} bytes, "
            f"header {dims} implies {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip when ``compress`` (default: path ends in .gz)."""
    path = Path(path)
    arr = np.asarray(array)
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    if dt not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    header = bytes([0, 0, _IDX_CODES[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(dt).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path
