"""Tests for the dataset registry (mdmsearch.data): no network, all files synthetic."""

from __future__ import annotations

import gzip
import logging
import math
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from mdmsearch.data import (
    DATA_DIR_ENV,
    DATASETS,
    CorruptDatasetError,
    DataBundle,
    DatasetUnavailableError,
    available_datasets,
    clear_cache,
    default_data_dir,
    load_cached,
    load_dataset,
    load_from_config,
    read_idx,
    register_dataset,
    save_image_grid,
    save_scatter,
    write_idx,
)
from mdmsearch.errors import MDMError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHARED_MNIST = Path("/work/shared/data/mnist")
FILE_FREE = sorted(name for name, entry in DATASETS.items() if not entry.needs_files)


# ----------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file for a uint8 array, written independently of mdmsearch.data.idx."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist_split(folder: Path, prefix: str, images: np.ndarray, *, gz: bool) -> None:
    """Write ``{prefix}-images-idx3-ubyte`` / ``-labels-idx1-ubyte`` (optionally .gz)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(images.shape[0], dtype=np.uint8) % 10
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        payload = _idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)


def _random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _rows(x: torch.Tensor) -> set[bytes]:
    """Each example as bytes: lets us compare splits by content."""
    return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}


def _assert_disjoint(b: DataBundle) -> None:
    tr, va, te = _rows(b.train), _rows(b.val), _rows(b.test)
    assert not tr & va and not tr & te and not va & te


def _assert_one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg


# ----------------------------------------------------------------------------- registry


def test_registry_lists_all_datasets():
    names = set(available_datasets())
    expected = {"gaussian", "checkerboard", "moons", "8gaussians", "digits", "mnist", "cifar10", "imagenet32"}
    assert expected <= names
    assert available_datasets() == sorted(available_datasets())
    assert {"mnist", "cifar10", "imagenet32"}.isdisjoint(FILE_FREE)


def test_unknown_dataset_names_it_and_lists_available():
    with pytest.raises(ValueError) as info:
        load_dataset("no-such-data")
    msg = str(info.value)
    assert "no-such-data" in msg and "mnist" in msg and "gaussian" in msg
    assert isinstance(info.value, MDMError)


def test_register_dataset_decorator_and_duplicate_name():
    @register_dataset("tmp-test-data")
    def _loader(request, *, value: float = 1.0):
        x = torch.full((4, 3), value)
        return DataBundle("tmp-test-data", (3,), None, x, x[:1], x[:2])

    try:
        b = load_dataset("TMP-test-data", value=2.0, n_train=2)
        assert b.train.shape == (2, 3) and float(b.train[0, 0]) == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tmp-test-data")(_loader)
        with pytest.raises(TypeError):
            load_dataset("tmp-test-data", bogus=1)
    finally:
        DATASETS.pop("tmp-test-data", None)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir() == Path.home() / ".cache" / "mdmsearch" / "data"


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("gaussian", n_train=0)
    with pytest.raises(ValueError, match="n_val"):
        load_dataset("digits", n_val=1000, n_test=1000)


# ----------------------------------------------------------------------------- file-free datasets


@pytest.mark.parametrize("name", FILE_FREE)
def test_file_free_dataset_shapes_and_splits(name):
    b = load_dataset(name, seed=0)
    assert b.name == name
    for split in ("train", "val", "test"):
        x = b.split(split)
        assert x.shape[0] > 0 and tuple(x.shape[1:]) == b.shape
        if b.is_discrete:
            assert x.dtype == torch.uint8 and int(x.max()) <= b.levels - 1
        else:
            assert b.levels is None and x.dtype == torch.float32
            assert torch.isfinite(x).all() and x.abs().max() < 10
    assert b.dim == math.prod(b.shape)
    _assert_disjoint(b)

    again = load_dataset(name, seed=0)
    other = load_dataset(name, seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(b.split(split), again.split(split))
    assert not torch.equal(b.train, other.train)


@pytest.mark.parametrize("name", ["checkerboard", "moons", "8gaussians"])
def test_toys_are_2d_and_roughly_standardized(name):
    b = load_dataset(name)
    assert b.shape == (2,) and not b.is_discrete
    assert b.train.shape == (4096, 2) and b.val.shape == (1024, 2) and b.test.shape == (1024, 2)
    assert b.train.mean(0).abs().max() < 0.2
    std = b.train.std(0)
    assert ((std > 0.7) & (std < 1.3)).all()


def test_gaussian_meta_and_exact_likelihood():
    b = load_dataset("gaussian", dim=3, mu=0.1, var=0.25, n_train=20000, n_test=20000)
    assert b.shape == (3,) and b.dim == 3
    assert b.meta["mu"] == 0.1 and b.meta["var"] == 0.25 and b.meta["dim"] == 3
    assert b.train.shape == (20000, 3) and b.val.shape == (1024, 3)
    assert torch.allclose(b.train.mean(0), torch.full((3,), 0.1), atol=0.02)
    assert torch.allclose(b.train.var(0), torch.full((3,), 0.25), atol=0.02)
    mu, var = b.meta["mu"], b.meta["var"]
    nll = (0.5 * math.log(2 * math.pi * var) + (b.test - mu) ** 2 / (2 * var)).sum(1).mean()
    entropy = 3 * 0.5 * math.log(2 * math.pi * math.e * var)
    assert abs(float(nll) - entropy) < 0.05
    with pytest.raises(TypeError):
        b.meta["mu"] = 1.0  # read-only


def test_generated_sizes_follow_n_args():
    b = load_dataset("moons", n_train=10, n_val=3, n_test=4)
    assert b.sizes() == {"train": 10, "val": 3, "test": 4}


def test_a_data_config_loads_its_dataset_once_per_process():
    """load_from_config is load_dataset with the config's fields; load_cached keeps one bundle
    per distinct configuration (the search's trials, dry run and preflight share it)."""
    from mdmsearch.config import DataConfig

    cfg = DataConfig(name="moons", seed=3, n_train=10, n_val=3, n_test=4)
    direct = load_from_config(cfg)
    assert torch.equal(direct.train, load_dataset("moons", seed=3, n_train=10, n_val=3, n_test=4).train)
    clear_cache()
    try:
        first = load_cached(cfg)
        assert first is not direct and torch.equal(first.val, direct.val)
        assert load_cached(cfg.model_copy()) is first  # equal configurations, one bundle
        other = load_cached(cfg.model_copy(update={"seed": 4}))
        assert other is not first and not torch.equal(other.train, first.train)
        clear_cache()
        assert load_cached(cfg) is not first
    finally:
        clear_cache()


def test_digits():
    b = load_dataset("digits")
    assert b.levels == 17 and b.shape == (1, 8, 8) and b.is_discrete and b.dim == 64
    assert sum(b.sizes().values()) == 1797
    assert b.sizes() == {"train": 1257, "val": 270, "test": 270}
    assert int(max(b.train.max(), b.val.max(), b.test.max())) == 16
    assert int(min(b.train.min(), b.val.min(), b.test.min())) == 0
    capped = load_dataset("digits", n_train=100)
    assert capped.train.shape[0] == 100
    assert torch.equal(capped.train, b.train[:100]) and torch.equal(capped.test, b.test)


def test_bundle_validation():
    x = torch.zeros(4, 2)
    with pytest.raises(TypeError, match="dtype"):
        DataBundle("bad", (2,), 256, x, x, x)  # discrete data must be uint8
    with pytest.raises(ValueError, match="shape"):
        DataBundle("bad", (3,), None, x, x, x)
    with pytest.raises(ValueError, match="split"):
        DataBundle("ok", (2,), None, x, x, x).split("holdout")


# ----------------------------------------------------------------------------- IDX + MNIST


def test_idx_roundtrip(tmp_path):
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.arange(5, dtype=np.int32)):
        for name in ("a.idx", "a.idx.gz"):
            path = write_idx(tmp_path / name, arr)
            back = read_idx(path)
            assert back.dtype == arr.dtype and np.array_equal(back, arr)
    # our reader parses a file written by the independent helper above
    raw = tmp_path / "ind"
    raw.write_bytes(_idx_bytes(_random_images(3, 0)))
    assert np.array_equal(read_idx(raw, ndim=3), _random_images(3, 0))


def test_mnist_test_split_only_gz(tmp_path, caplog):
    images = _random_images(50, seed=1)
    _write_mnist_split(tmp_path, "t10k", images, gz=True)
    with caplog.at_level(logging.WARNING, logger="mdmsearch.data"):
        b = load_dataset("mnist", data_dir=tmp_path, seed=3)
    assert any("only the official test split" in r.getMessage() for r in caplog.records)
    assert b.shape == (1, 28, 28) and b.levels == 256 and b.train.dtype == torch.uint8
    assert b.sizes() == {"train": 40, "val": 5, "test": 5}
    _assert_disjoint(b)
    # the three splits are exactly the written images, unscaled
    assert _rows(torch.cat([b.train, b.val, b.test])) == _rows(torch.from_numpy(images))
    assert torch.equal(load_dataset("mnist", data_dir=tmp_path, seed=3).test, b.test)
    assert not torch.equal(load_dataset("mnist", data_dir=tmp_path, seed=4).test, b.test)
    sized = load_dataset("mnist", data_dir=tmp_path, seed=3, n_train=10, n_val=8, n_test=7)
    assert sized.sizes() == {"train": 10, "val": 8, "test": 7}


def test_mnist_both_splits_torchvision_layout(tmp_path):
    train_imgs, test_imgs = _random_images(60, seed=2), _random_images(20, seed=5)
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist_split(raw, "train", train_imgs, gz=False)
    _write_mnist_split(raw, "t10k", test_imgs, gz=False)
    b = load_dataset("mnist", data_dir=tmp_path)
    assert b.sizes() == {"train": 54, "val": 6, "test": 20}  # holdout = min(5000, 10%)
    assert _rows(b.test) == _rows(torch.from_numpy(test_imgs))
    assert _rows(torch.cat([b.train, b.val])) == _rows(torch.from_numpy(train_imgs))
    _assert_disjoint(b)
    b2 = load_dataset("mnist", data_dir=tmp_path, n_val=10, n_test=5)
    assert b2.sizes() == {"train": 50, "val": 10, "test": 5}


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST test split not present")
def test_mnist_shared_official_test_split():
    b = load_dataset("mnist", data_dir=SHARED_MNIST)
    assert b.shape == (1, 28, 28) and b.levels == 256
    assert b.sizes() == {"train": 8000, "val": 1000, "test": 1000}
    assert b.train.dtype == torch.uint8 and int(b.train.max()) == 255 and int(b.train.min()) == 0


class _OfflineTorchvision:
    """Stand-in for a torchvision dataset class whose download fails like urllib offline."""

    calls = 0

    def __init__(self, *args, **kwargs):
        type(self).calls += 1
        raise URLError("[Errno -3] Temporary failure in name resolution")


def _offline(monkeypatch, attr: str) -> type:
    import torchvision.datasets

    cls = type("Offline" + attr, (_OfflineTorchvision,), {"calls": 0})
    monkeypatch.setattr(torchvision.datasets, attr, cls)
    return cls


def test_mnist_offline_download_is_one_line_error(monkeypatch, tmp_path):
    fake = _offline(monkeypatch, "MNIST")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", data_dir=tmp_path / "empty", download=True)
    assert fake.calls == 1
    msg = str(info.value)
    _assert_one_line(info.value)
    assert msg.startswith("mnist:") and "download failed" in msg and "name resolution" in msg
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path / "empty") in msg
    assert info.value.__cause__ is None  # no urllib traceback chained onto it


def test_mnist_missing_without_download(monkeypatch, tmp_path):
    fake = _offline(monkeypatch, "MNIST")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert fake.calls == 0  # never tries the network unless asked
    _assert_one_line(info.value)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "download" in msg and str(tmp_path) in msg


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x08\x03\x00\x00" + b"\x00" * 20, "magic"),  # wrong magic number
        (_idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10], "payload"),  # truncated
        (_idx_bytes(np.zeros((4,), np.uint8)), "dimensions"),  # labels where images belong
        (gzip.compress(_idx_bytes(np.zeros((2, 28, 28), np.uint8)), mtime=0)[:-12], "gzip"),  # cut gzip
        (b"", "magic"),
    ],
    # (named ids: test ids must be the same in every pytest-xdist worker, and readable)
    ids=["wrong-magic", "truncated", "labels-as-images", "cut-gzip", "empty"],
)
def test_corrupted_idx_file(tmp_path, payload, match):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(payload)
    with pytest.raises(CorruptDatasetError, match=match) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-images-idx3-ubyte" in str(info.value)
    assert isinstance(info.value, DatasetUnavailableError)


def test_mnist_label_count_mismatch(tmp_path):
    _write_mnist_split(tmp_path, "t10k", _random_images(10, 0), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(CorruptDatasetError, match="labels"):
        load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- ImageNet32, CIFAR10


def _write_imagenet32(folder: Path, name: str, n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, data=data, labels=np.arange(n) % 1000 + 1)
    return data


def test_imagenet32_from_npz(tmp_path):
    d1 = _write_imagenet32(tmp_path, "train_data_batch_1.npz", 30, 0)
    d2 = _write_imagenet32(tmp_path, "train_data_batch_2.npz", 20, 1)
    val = _write_imagenet32(tmp_path, "val_data.npz", 15, 2)
    b = load_dataset("imagenet32", data_dir=tmp_path, seed=0)
    assert b.shape == (3, 32, 32) and b.levels == 256 and b.train.dtype == torch.uint8
    assert b.sizes() == {"train": 45, "val": 5, "test": 15}
    assert b.meta["train_batches"] == ["train_data_batch_1.npz", "train_data_batch_2.npz"]
    # channel-first layout: row r of the npz is image r reshaped to [3, 32, 32]
    expected_test = torch.from_numpy(val.reshape(-1, 3, 32, 32))
    assert _rows(b.test) == _rows(expected_test)
    first = torch.from_numpy(d1[0].reshape(3, 32, 32))
    assert any(torch.equal(first, x) for x in torch.cat([b.train, b.val]))
    assert _rows(torch.cat([b.train, b.val])) == _rows(torch.from_numpy(np.concatenate([d1, d2])))
    _assert_disjoint(b)
    assert torch.equal(load_dataset("imagenet32", data_dir=tmp_path, seed=0).val, b.val)


def test_imagenet32_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="val_data.npz") as info:
        load_dataset("imagenet32", data_dir=tmp_path, download=True)
    _assert_one_line(info.value)
    np.savez(tmp_path / "val_data.npz", pixels=np.zeros((2, 3072), np.uint8))
    with pytest.raises(CorruptDatasetError, match="val_data.npz"):
        load_dataset("imagenet32", data_dir=tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptDatasetError):
        load_dataset("imagenet32", data_dir=tmp_path)


def test_cifar10_missing(monkeypatch, tmp_path):
    fake = _offline(monkeypatch, "CIFAR10")
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(info.value)
    assert fake.calls == 0
    with pytest.raises(DatasetUnavailableError, match="download failed") as info:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    _assert_one_line(info.value)
    assert fake.calls == 1


def test_cifar10_local_files_via_torchvision(monkeypatch, tmp_path):
    import torchvision.datasets

    (tmp_path / "cifar-10-batches-py").mkdir()
    rng = np.random.default_rng(0)
    hwc = {True: rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
           False: rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)}
    seen = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            seen.append((root, train, download))
            self.data = hwc[train]  # torchvision's layout: [N, 32, 32, 3]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    b = load_dataset("cifar10", data_dir=tmp_path)
    assert seen == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    assert b.shape == (3, 32, 32) and b.levels == 256
    assert b.sizes() == {"train": 36, "val": 4, "test": 10}
    chw = torch.from_numpy(hwc[False]).permute(0, 3, 1, 2)
    assert _rows(b.test) == _rows(chw)


# ----------------------------------------------------------------------------- grids


def test_save_image_grid_png(tmp_path):
    from PIL import Image

    images = torch.rand(4, 1, 8, 8)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=2)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2x2 grid of 8x8 enlarged 4x, padding 2
    path = save_image_grid(images, tmp_path / "native.png", nrow=2, min_size=1)
    with Image.open(path) as im:
        assert im.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    rgb = save_image_grid(torch.rand(5, 3, 32, 32) * 2 - 0.5, tmp_path / "rgb.png")  # clamped
    assert rgb.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        save_image_grid(torch.rand(8, 8), tmp_path / "bad.png")


def test_save_scatter_png(tmp_path):
    pts = load_dataset("moons", n_train=200).train
    path = save_scatter(pts, tmp_path / "scatter.png", title="moons", lim=3.0)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert save_scatter(pts.numpy(), tmp_path / "np.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        save_scatter(torch.zeros(5, 3), tmp_path / "bad.png")
