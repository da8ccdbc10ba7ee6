"""A small CNN trained on a dataset's own training split, whose penultimate layer is the
feature space of the sample-quality metrics for 1-channel datasets (digits, MNIST).

Training is deterministic (fixed seed, one thread, its own RNG streams) and runs once per
content hash of (training pixels and labels, levels, architecture and hyperparameters,
:data:`CLASSIFIER_VERSION`); the weights, the held-out accuracy on the test split and the
feature scale are cached in ``cache_dir()`` (atomic write). A cache file that cannot be loaded
is retrained and overwritten, never an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import dataclasses
import logging
import math
import pickle
import time
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdmsearch.data.base import DataBundle
from mdmsearch.io import atomic_write
from mdmsearch.errors import one_line
from mdmsearch.quality.base import cache_dir, check_image_data, content_hash, train_hash
from mdmsearch.quality.labels import split_labels

__all__ = ["CLASSIFIER_VERSION", "ClassifierSpec", "SmallCNN", "TrainedClassifier", "classifier_key",
           "get_classifier", "clear_classifier_memory"]

logger = logging.getLogger(__name__)

CLASSIFIER_VERSION = "1"  # bump when training or feature extraction changes meaning
_BATCH_EVAL = 512
# what a damaged / foreign cache file can raise while loading: it is then retrained
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                pickle.UnpicklingError, zipfile.BadZipFile)

_MEMORY: dict[str, "TrainedClassifier"] = {}  # key -> classifier loaded in this process
_KEYS: "weakref.WeakKeyDictionary[DataBundle, dict]" = weakref.WeakKeyDictionary()  # bundle -> spec -> key


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and training hyperparameters (all part of the cache key)."""

    width: int = 32  # channels of the first conv block; doubled per block
    hidden: int = 128  # penultimate (feature) layer width
    dropout: float = 0.3
    batch_size: int = 64
    min_steps: int = 1500  # epochs = max(min_epochs, ceil(min_steps / steps per epoch))
    min_epochs: int = 3
    lr: float = 3e-3  # one-cycle peak
    weight_decay: float = 1e-4
    max_shift: int | None = None  # random-translation augmentation in pixels; None: 1 per 14 pixels of width
    seed: int = 0

    def shift_for(self, width: int) -> int:
        return self.max_shift if self.max_shift is not None else max(1, round(width / 14))


class SmallCNN(nn.Module):
    """[conv3x3-ReLU-conv3x3-ReLU-maxpool2] blocks until both sides are <= 7, then fc -> ReLU (features) -> fc."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int, spec: ClassifierSpec):
        super().__init__()
        (channels, h, w), width = shape, spec.width
        layers: list[nn.Module] = []
        while max(h, w) > 7:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, h, w, width = width, h // 2, w // 2, width * 2
        self.body = nn.Sequential(*layers)  # [B, C, H, W] -> [B, channels, h, w]
        self.fc = nn.Linear(channels * h * w, spec.hidden)
        self.drop = nn.Dropout(spec.dropout)
        self.out = nn.Linear(spec.hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> penultimate activations [B, hidden]."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))  # [B, n_classes]


def _unit(pixels: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer pixels [N, C, H, W] -> float32 in [-1, 1]."""
    return pixels.to(torch.float32) * (2.0 / (levels - 1)) - 1.0


@dataclass
class TrainedClassifier:
    """A trained classifier and what was measured when it was trained."""

    net: SmallCNN
    spec: ClassifierSpec
    key: str
    dataset: str
    levels: int
    accuracy: float  # on the dataset's test split
    active: torch.Tensor  # int64 [d]: penultimate units not dead on the training split (the features)
    feature_scale: float  # RMS of a training feature coordinate; features are divided by it
    train_seconds: float
    path: Path
    trained_now: bool = False

    @property
    def name(self) -> str:
        """Feature-space name: comparable scores share it."""
        return f"classifier-{self.dataset}-{self.key[:12]}"

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> np.ndarray:
        """Integer pixels [N, C, H, W] -> float64 features [N, d] (the active penultimate units),
        scaled to unit RMS on the training split."""
        self.net.eval()
        chunks = [self.net.features(_unit(pixels[i:i + _BATCH_EVAL].cpu(), self.levels))[:, self.active]
                  for i in range(0, pixels.shape[0], _BATCH_EVAL)]  # each [B, d]
        return torch.cat(chunks).to(torch.float64).numpy() / self.feature_scale

    __call__ = features


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One intra-op thread and a private, seeded global RNG (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _translate(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation by up to ``k`` pixels (zero padding): [B, C, H, W] -> same shape."""
    b, _, h, w = x.shape
    padded = F.pad(x, (k, k, k, k), value=-1.0)  # -1 is pixel value 0
    dy = torch.randint(0, 2 * k + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * k + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * k)
    out = padded.gather(2, rows)  # [B, C, H, W + 2k]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)  # [B, C, H, W]


@torch.no_grad()
def _accuracy(net: SmallCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x[i:i + _BATCH_EVAL]).argmax(1) for i in range(0, x.shape[0], _BATCH_EVAL)])
    return float((pred == y).to(torch.float64).mean())


def _train(data: DataBundle, spec: ClassifierSpec) -> tuple[SmallCNN, float, torch.Tensor, float, float]:
    """Train on ``data.train``; returns (net, test accuracy, active units, feature scale, seconds)."""
    levels = check_image_data(data)
    y_train, y_test = split_labels(data, "train"), split_labels(data, "test")  # [N_train], [N_test]
    x_train, x_test = _unit(data.train, levels), _unit(data.test, levels)  # [N, C, H, W] in [-1, 1]
    n, n_classes = x_train.shape[0], int(max(y_train.max(), y_test.max())) + 1
    per_epoch = math.ceil(n / spec.batch_size)
    epochs = max(spec.min_epochs, math.ceil(spec.min_steps / per_epoch))
    shift = spec.shift_for(data.shape[2])
    t0 = time.perf_counter()
    with _deterministic(spec.seed):
        gen = torch.Generator().manual_seed(spec.seed)
        net = SmallCNN(data.shape, n_classes, spec)
        opt = torch.optim.AdamW(net.parameters(), lr=spec.lr / 10, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=epochs * per_epoch)
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(n, generator=gen).split(spec.batch_size):
                loss = F.cross_entropy(net(_translate(x_train[idx], shift, gen)), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        accuracy = _accuracy(net, x_test, y_test)
        with torch.no_grad():
            feats = torch.cat([net.features(x_train[i:i + _BATCH_EVAL]) for i in range(0, n, _BATCH_EVAL)])
        active = torch.nonzero(feats.amax(0) > 0).flatten()  # [d] units that fire on some training image
        scale = float(feats[:, active].to(torch.float64).pow(2).mean().sqrt().clamp_min(1e-12))
    seconds = time.perf_counter() - t0
    logger.info("%s classifier: %d epochs on %d images in %.1fs, held-out accuracy %.4f on %d test images, "
                "%d of %d feature units active", data.name, epochs, n, seconds, accuracy, x_test.shape[0],
                active.numel(), spec.hidden)
    return net, accuracy, active, scale, seconds


def classifier_key(data: DataBundle, spec: ClassifierSpec | None = None) -> str:
    """Content hash of (training pixels, levels, labels, test split, spec, version): the cache key
    (computed once per bundle object and spec)."""
    spec = spec or ClassifierSpec()
    known = _KEYS.setdefault(data, {})
    if spec not in known:
        known[spec] = _key(data, spec)
    return known[spec]


def _key(data: DataBundle, spec: ClassifierSpec) -> str:
    return content_hash("mdmsearch.quality.classifier", CLASSIFIER_VERSION, dataclasses.asdict(spec),
                        list(data.shape), train_hash(data), split_labels(data, "train"),
                        data.test, split_labels(data, "test"))


def _cache_path(dataset: str, key: str) -> Path:
    return cache_dir() / f"classifier-{dataset}-{key[:16]}.pt"


def _save(path: Path, clf: TrainedClassifier) -> None:
    payload = {"version": CLASSIFIER_VERSION, "key": clf.key, "dataset": clf.dataset, "levels": clf.levels,
               "spec": dataclasses.asdict(clf.spec), "accuracy": clf.accuracy, "active": clf.active,
               "feature_scale": clf.feature_scale, "train_seconds": clf.train_seconds,
               "n_classes": clf.net.out.out_features, "state_dict": clf.net.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load(path: Path, key: str, data: DataBundle, spec: ClassifierSpec) -> TrainedClassifier:
    """The cached classifier at ``path``; raises one of ``_LOAD_ERRORS`` if it is damaged or foreign."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["key"] != key or payload["version"] != CLASSIFIER_VERSION:
        raise ValueError(f"cache file holds key {str(payload['key'])[:16]}, expected {key[:16]}")
    net = SmallCNN(data.shape, int(payload["n_classes"]), spec)
    net.load_state_dict(payload["state_dict"])  # strict: missing / extra / misshapen tensors raise
    scale, active = float(payload["feature_scale"]), payload["active"].to(torch.int64)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"bad feature scale {scale}")
    if active.dim() != 1 or active.numel() == 0 or int(active.min()) < 0 or int(active.max()) >= spec.hidden:
        raise ValueError(f"bad active-unit list of shape {tuple(active.shape)}")
    return TrainedClassifier(net.eval(), spec, key, data.name, int(payload["levels"]), float(payload["accuracy"]),
                             active, scale, float(payload["train_seconds"]), path)


def get_classifier(data: DataBundle, spec: ClassifierSpec | None = None) -> TrainedClassifier:
    """The classifier for ``data`` and ``spec``: from this process, else the disk cache, else trained
    (and cached). ``trained_now`` tells whether this call trained it."""
    spec = spec or ClassifierSpec()
    levels = check_image_data(data)
    key = classifier_key(data, spec)
    if key in _MEMORY:
        _MEMORY[key].trained_now = False
        return _MEMORY[key]
    path = _cache_path(data.name, key)
    with _training_lock(path):  # the workers of a search starting together: one trains, the others load
        clf = _load_cached(path, key, data, spec)
        if clf is None:
            net, accuracy, active, scale, seconds = _train(data, spec)
            clf = TrainedClassifier(net.eval(), spec, key, data.name, levels, accuracy, active, scale, seconds, path,
                                    trained_now=True)
            try:
                _save(path, clf)
            except OSError as exc:
                logger.warning("cannot write the classifier cache %s (%s); it will be retrained next time",
                               path, one_line(exc))
    _MEMORY[key] = clf
    return clf


def _load_cached(path: Path, key: str, data: DataBundle, spec: ClassifierSpec) -> TrainedClassifier | None:
    if not path.is_file():
        return None
    try:
        return _load(path, key, data, spec)
    except _LOAD_ERRORS as exc:
        logger.warning("classifier cache %s cannot be loaded (%s); retraining", path, one_line(exc))
        return None


@contextlib.contextmanager
def _training_lock(path: Path) -> Iterator[None]:
    """An exclusive lock next to the cache file (a lock file that cannot be made: no lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_suffix(".lock"), "a+")
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clear_classifier_memory() -> None:
    """Forget the classifiers loaded in this process (the disk cache stays)."""
    _MEMORY.clear()

