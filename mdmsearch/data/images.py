"""Image datasets: digits (bundled with scikit-learn), MNIST, CIFAR10, ImageNet32.

All of them return integer pixels as ``uint8`` tensors ``[N, C, H, W]`` with
``levels`` set (17 for digits, 256 otherwise); nothing is rescaled here.
File-backed datasets raise :class:`DatasetUnavailableError` with one readable
line when their files are missing and cannot be downloaded, and
:class:`CorruptDatasetError` when a file exists but cannot be parsed.
"""

from __future__ import annotations

import http.client
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from mdmsearch.data.base import (
    CorruptDatasetError,
    DataBundle,
    DatasetRequest,
    DatasetUnavailableError,
    fraction_size,
    partition,
    splits_from_files,
)
from mdmsearch.data.idx import read_idx
from mdmsearch.data.registry import register_dataset

logger = logging.getLogger(__name__)

# Errors a torchvision download / local read can raise (URLError, HTTPError and
# socket timeouts are OSErrors; torchvision wraps mirror failures in RuntimeError).
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, http.client.HTTPException)


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` (``... last line`` appended for multi-line messages)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    msg = lines[0] if lines else ""
    if len(lines) > 1:
        msg = f"{msg.rstrip(':')} ... {lines[-1]}"
    return f"{type(exc).__name__}: {msg}".rstrip(": ")


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of ``exc`` and of its root cause, truncated to one short line."""
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    text = _one_line(exc) if root is exc else f"{_one_line(exc)} ({_one_line(root)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _download_failed(name: str, root: Path, exc: BaseException, hint: str) -> DatasetUnavailableError:
    logger.debug("%s: download failed", name, exc_info=exc)
    return DatasetUnavailableError(
        f"{name}: no local files in {root} and download failed (offline?): "
        f"{_short_reason(exc)}. {hint}"
    )


# --------------------------------------------------------------------------- digits


@register_dataset("digits")
def load_digits(request: DatasetRequest) -> DataBundle:
    """sklearn's 1797 8x8 digits, pixels 0..16 (17 levels), seeded 70/15/15 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    images = sk_load_digits().images  # [1797, 8, 8] float64 holding integers 0..16
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8]
    n = int(x.shape[0])
    train, val, test = partition(
        x,
        n_val=request.n_val if request.n_val is not None else fraction_size(n, 0.15),
        n_test=request.n_test if request.n_test is not None else fraction_size(n, 0.15),
        n_train=request.n_train,
        generator=request.generator(),
        name="digits",
    )
    return DataBundle("digits", (1, 8, 8), 17, train, val, test, meta={"source": "sklearn"})


# --------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_NAMES = ", ".join(f"{stem}[.gz]" for pair in MNIST_FILES.values() for stem in pair)


def mnist_search_dirs(root: Path) -> list[Path]:
    """Where MNIST IDX files may live: ``root`` itself, torchvision's layout, ``root/mnist``."""
    return [root, root / "MNIST" / "raw", root / "mnist"]


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    """First ``stem`` or ``stem.gz`` found in ``dirs`` (raw preferred within a dir)."""
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_mnist_files(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """split -> (images file, labels file or None) for each split whose images exist."""
    dirs = mnist_search_dirs(root)
    found: dict[str, tuple[Path, Path | None]] = {}
    for split, (images_stem, labels_stem) in MNIST_FILES.items():
        images = _find_file(dirs, images_stem)
        if images is not None:
            found[split] = (images, _find_file([images.parent], labels_stem))
    return found


def read_mnist_images(images: Path, labels: Path | None = None) -> torch.Tensor:
    """IDX images (and optional labels, only checked for consistency) -> uint8 [N, 1, 28, 28]."""
    x = read_idx(images, ndim=3)  # [N, 28, 28]
    if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
        raise CorruptDatasetError(
            f"mnist: {images} holds {x.dtype} images of shape {x.shape[1:]}, expected uint8 28x28"
        )
    if labels is not None:
        y = read_idx(labels, ndim=1)  # [N]
        if y.shape[0] != x.shape[0]:
            raise CorruptDatasetError(
                f"mnist: {labels} has {y.shape[0]} labels but {images} has {x.shape[0]} images"
            )
    return torch.from_numpy(x).unsqueeze(1)  # [N, 1, 28, 28]


# where a missing-data message sends the user: a search spec or run config names the folder in
# data.data_dir, ``mdmsearch train`` also takes it as --data-dir (and --download)
_POINT_ELSEWHERE = "set data.data_dir to their folder (mdmsearch train: --data-dir)"
_ENABLE_DOWNLOAD = "enable the download (data.download: true; mdmsearch train: --download)"


def _download_mnist(root: Path) -> None:
    """torchvision download into ``root/MNIST/raw``; every failure -> one-line error."""
    import torchvision.datasets

    hint = f"Put the official IDX files ({_MNIST_NAMES}) in {root} or {_POINT_ELSEWHERE}."
    try:
        for train in (True, False):
            torchvision.datasets.MNIST(root=str(root), train=train, download=True)
    except _DOWNLOAD_ERRORS as exc:
        raise _download_failed("mnist", root, exc, hint) from None


@register_dataset("mnist", needs_files=True)
def load_mnist(request: DatasetRequest, *, val_size: int = 5000) -> DataBundle:
    """MNIST 28x28 from local IDX files (or torchvision download); 256 levels.

    Both official splits: train = 60k minus a seeded ``val_size`` holdout, test =
    the official 10k. Only one split on disk (e.g. just ``t10k-*``): a seeded
    80/10/10 split of it (sizes overridable with n_train/n_val/n_test).
    """
    root = request.data_dir
    files = find_mnist_files(root)
    if not files:
        if not request.download:
            raise DatasetUnavailableError(
                f"mnist: no local files in {root} (looked in "
                f"{', '.join(str(d) for d in mnist_search_dirs(root))}); expected the official "
                f"IDX files {_MNIST_NAMES}. Put them there, {_POINT_ELSEWHERE}, or {_ENABLE_DOWNLOAD}."
            )
        _download_mnist(root)
        files = find_mnist_files(root)
        if not files:
            raise DatasetUnavailableError(
                f"mnist: download reported success but no IDX files were found under {root}"
            )
    loaded = {split: read_mnist_images(*paths) for split, paths in files.items()}
    (train, val, test), source = splits_from_files(
        "mnist", loaded.get("train"), loaded.get("test"), request=request, val_size=val_size
    )
    meta = {"source": source, "files": [str(p) for pair in files.values() for p in pair if p]}
    return DataBundle("mnist", (1, 28, 28), 256, train, val, test, meta=meta)


# --------------------------------------------------------------------------- CIFAR10

_CIFAR_DIRNAME = "cifar-10-batches-py"


def find_cifar10_root(root: Path) -> Path | None:
    """The directory holding ``cifar-10-batches-py`` (``root`` or ``root/cifar10``)."""
    for candidate in (root, root / "cifar10", root / "CIFAR10"):
        if (candidate / _CIFAR_DIRNAME).is_dir():
            return candidate
    return None


@register_dataset("cifar10", needs_files=True)
def load_cifar10(request: DatasetRequest, *, val_size: int = 5000) -> DataBundle:
    """CIFAR10 via torchvision (pickle batches in ``cifar-10-batches-py``); 256 levels."""
    import torchvision.datasets

    root = request.data_dir
    base = find_cifar10_root(root)
    if base is None and not request.download:
        raise DatasetUnavailableError(
            f"cifar10: no local files in {root} (expected {root / _CIFAR_DIRNAME}/ with "
            f"data_batch_1..5 and test_batch). Put them there, {_POINT_ELSEWHERE}, or {_ENABLE_DOWNLOAD}."
        )
    hint = f"Put the extracted {_CIFAR_DIRNAME}/ folder in {root} or {_POINT_ELSEWHERE}."
    try:
        sets = [
            torchvision.datasets.CIFAR10(root=str(base or root), train=t, download=request.download)
            for t in (True, False)
        ]
    except (*_DOWNLOAD_ERRORS, pickle.UnpicklingError) as exc:
        if base is None:
            raise _download_failed("cifar10", root, exc, hint) from None
        raise CorruptDatasetError(
            f"cifar10: cannot read {base / _CIFAR_DIRNAME}: {_short_reason(exc)}"
        ) from None
    # torchvision keeps HWC uint8 [N, 32, 32, 3]; we want CHW [N, 3, 32, 32].
    train_full, test_full = (
        torch.from_numpy(np.ascontiguousarray(s.data)).permute(0, 3, 1, 2).contiguous()
        for s in sets
    )
    (train, val, test), source = splits_from_files(
        "cifar10", train_full, test_full, request=request, val_size=val_size
    )
    return DataBundle("cifar10", (3, 32, 32), 256, train, val, test, meta={"source": source})


# --------------------------------------------------------------------------- ImageNet32

IMAGENET32_TRAIN = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
IMAGENET32_VAL = "val_data.npz"


def imagenet32_search_dirs(root: Path) -> list[Path]:
    """``root`` and ``root/imagenet32``, plus the official archives' folder names under each."""
    dirs = []
    for base in (root, root / "imagenet32"):
        dirs += [base, base / "Imagenet32_train_npz", base / "Imagenet32_val_npz"]
    return dirs


def read_imagenet32_npz(path: Path) -> torch.Tensor:
    """One official npz batch (key ``data``: uint8 [N, 3072], channel-first) -> [N, 3, 32, 32]."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = f["data"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptDatasetError(f"imagenet32: cannot read {path}: {_short_reason(exc)}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(
            f"imagenet32: {path} key 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))  # [N, 3, 32, 32]


@register_dataset("imagenet32", needs_files=True)
def load_imagenet32(request: DatasetRequest, *, val_size: int = 10000) -> DataBundle:
    """Downsampled ImageNet 32x32 from the official npz batches; val_data.npz is the test split."""
    root = request.data_dir
    dirs = imagenet32_search_dirs(root)
    train_files = [p for p in (_find_file(dirs, name) for name in IMAGENET32_TRAIN) if p]
    test_file = _find_file(dirs, IMAGENET32_VAL)
    if not train_files and test_file is None:
        extra = " (automatic download is not supported: the files need an image-net.org login)"
        raise DatasetUnavailableError(
            f"imagenet32: no local files in {root}; expected {IMAGENET32_TRAIN[0]} .. "
            f"{IMAGENET32_TRAIN[-1]} and {IMAGENET32_VAL} there or in {root / 'imagenet32'}. "
            f"Put them there or {_POINT_ELSEWHERE}{extra if request.download else ''}."
        )
    logger.info("imagenet32: reading %d train batches from %s", len(train_files), root)
    train_full = torch.cat([read_imagenet32_npz(p) for p in train_files]) if train_files else None
    test_full = read_imagenet32_npz(test_file) if test_file is not None else None
    (train, val, test), source = splits_from_files(
        "imagenet32", train_full, test_full, request=request, val_size=val_size
    )
    meta = {"source": source, "train_batches": [p.name for p in train_files]}
    return DataBundle("imagenet32", (3, 32, 32), 256, train, val, test, meta=meta)
