"""Does the sample-quality score (mdmsearch.quality) measure what it should, and what does it cost?

Trains the feature classifier in a fresh temporary cache (so the training time is measured; the
user cache is not touched) on digits and, when the files are there, MNIST; then scores held-out
real images (KID ~ 0 within its SE), corrupted ones (uniform noise, blur, shuffled pixels: far
worse), a noise curve (monotone), and times scoring N=256 samples and FID at Inception's d=2048.

    python benchmarks/quality_sanity.py                       # digits + MNIST from --mnist-dir
    python benchmarks/quality_sanity.py --mnist-dir none      # digits only
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, md_table, write

from mdmsearch.data import load_dataset
from mdmsearch.data.base import DataBundle
from mdmsearch.quality import (ClassifierSpec, clear_classifier_memory, clear_reference_memory, get_classifier,
                               score_samples)
from mdmsearch.quality.degrade import degrade
from mdmsearch.quality.metrics import fid, frechet_distance, gaussian_stats, kid

log = logging.getLogger("quality_sanity")

N_SCORE = 256
NOISE_SIGMAS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]  # Gaussian noise std as a fraction of the pixel range
CORRUPTIONS = [("uniform noise", "uniform", 1.0), ("blur (sigma 1 px)", "blur", 1.0),
               ("shuffled pixels", "shuffle", 1.0), ("10% pixels replaced", "uniform", 0.1)]


def _row(label: str, res: dict) -> dict:
    return {"samples": label, "n": res["n"], "n_ref": res["n_ref"], "kid": res["kid"], "kid_se": res["kid_se"],
            "z": res["kid"] / res["kid_se"], "fid": res["fid"]}


def classifier_rows(data: DataBundle, seeds: list[int]) -> list[dict]:
    """Train the default classifier (and other training seeds) from scratch; accuracy and time."""
    rows = []
    for seed in seeds:
        clear_classifier_memory()
        clf = get_classifier(data, ClassifierSpec(seed=seed))
        rows.append({"dataset": data.name, "train": int(data.train.shape[0]), "test": int(data.test.shape[0]),
                     "spec_seed": seed, "accuracy": clf.accuracy, "train_s": clf.train_seconds,
                     "features": clf.name, "dim": int(clf.active.numel()), "trained_now": clf.trained_now})
        log.info("%s seed %d: accuracy %.4f in %.1fs", data.name, seed, clf.accuracy, clf.train_seconds)
    clear_classifier_memory()
    get_classifier(data)  # the default (seed 0) one for the scores below
    return rows


def real_rows(data: DataBundle, n: int, draws: int = 5) -> list[dict]:
    """Held-out real images against the training reference: random ``n``-subsets of val + test, each
    scored with its own reference seed; and val against test (no training images on either side)."""
    held_out = torch.cat([data.val, data.test])  # [N_val + N_test, C, H, W]
    rows = []
    for seed in range(draws):
        pick = torch.randperm(held_out.shape[0], generator=torch.Generator().manual_seed(100 + seed))[:n]
        res = score_samples(held_out[pick].to(torch.int64), data, seed=seed)
        rows.append(_row(f"held-out draw {seed} (ref seed {seed})", res))
    extractor = get_classifier(data)
    val, test = extractor(data.val[:n]), extractor(data.test)
    rows.append({"samples": f"val[:{val.shape[0]}] vs test (no training images)", "n": val.shape[0],
                 "n_ref": test.shape[0], **_z(kid(val, test)), "fid": fid(val, test)["fid"]})
    return rows


def _z(res: dict) -> dict:
    return {"kid": res["kid"], "kid_se": res["kid_se"], "z": res["kid"] / res["kid_se"]}


def corruption_rows(data: DataBundle, n: int) -> list[dict]:
    x = data.test[:n]
    return [_row(label, score_samples(degrade(x, data.levels, kind, s, seed=1), data))
            for label, kind, s in CORRUPTIONS]


def noise_curve(data: DataBundle, n: int) -> list[dict]:
    x = data.test[:n]
    rows = []
    for sigma in NOISE_SIGMAS:
        res = score_samples(degrade(x, data.levels, "gaussian", sigma, seed=1), data)
        rows.append({**_row(f"gaussian noise {sigma:g}", res), "sigma": sigma})
    return rows


def timings(data: DataBundle, n: int) -> dict:
    """Seconds to score ``n`` samples: first call (reference features computed) and later calls."""
    x = data.test.repeat(-(-n // data.test.shape[0]), 1, 1, 1)[:n].to(torch.int64)  # [n, C, H, W]
    clear_reference_memory()
    t0 = time.perf_counter()
    score_samples(x, data)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        score_samples(x, data)
        warm.append(time.perf_counter() - t0)
    return {"dataset": data.name, "n": n, "first_call_s": cold, "later_call_s": float(np.median(warm))}


def fid_2048_timing() -> dict:
    """FID's trace-of-square-root at Inception's d = 2048 (sqrtm vs the symmetric eigh route)."""
    rng = np.random.default_rng(0)
    a, b = gaussian_stats(rng.normal(size=(3000, 2048))), gaussian_stats(rng.normal(0.1, 1.1, size=(3000, 2048)))
    out = {}
    for method in ("sqrtm", "eigh"):
        t0 = time.perf_counter()
        out[f"fid_{method}"] = frechet_distance(*a, *b, method=method)
        out[f"{method}_s"] = time.perf_counter() - t0
    return out


def run_dataset(data: DataBundle, n: int, seeds: list[int]) -> dict:
    return {"classifier": classifier_rows(data, seeds), "real": real_rows(data, n),
            "corrupted": corruption_rows(data, n), "noise_curve": noise_curve(data, n),
            "timing": timings(data, N_SCORE)}


def markdown(results: dict, fid_timing: dict) -> str:
    fmt = {"accuracy": "{:.4f}", "train_s": "{:.1f}", "kid": "{:.4f}", "kid_se": "{:.4f}", "z": "{:.1f}",
           "fid": "{:.2f}", "first_call_s": "{:.2f}", "later_call_s": "{:.3f}", "sigma": "{:g}"}
    parts = []
    for name, res in results.items():
        parts += [f"## {name}", "", "Classifier (held-out accuracy on the test split, training time, one thread):", "",
                  md_table(res["classifier"], ["dataset", "train", "test", "spec_seed", "accuracy", "train_s", "dim",
                                               "features"], fmt), "",
                  "Held-out real images (random n-subsets of val + test) vs the training reference "
                  "(z = KID / SE; where n_ref is the whole training split, the reference seed only reorders it):",
                  "",
                  md_table(res["real"], ["samples", "n", "n_ref", "kid", "kid_se", "z", "fid"], fmt), "",
                  "Corrupted test images:", "",
                  md_table(res["corrupted"], ["samples", "n", "kid", "kid_se", "z", "fid"], fmt), "",
                  "Noise curve (Gaussian noise, std as a fraction of the pixel range):", "",
                  md_table(res["noise_curve"], ["sigma", "n", "kid", "kid_se", "z", "fid"], fmt), "",
                  f"Time to score N={res['timing']['n']}:", "",
                  md_table([res["timing"]], ["dataset", "n", "first_call_s", "later_call_s"], fmt), ""]
    parts += ["## FID at d = 2048 (Inception's pool features; synthetic statistics)", "",
              md_table([fid_timing], list(fid_timing), {k: "{:.3f}" for k in fid_timing}), ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                    help="folder with the MNIST IDX files ('none' to skip MNIST)")
    ap.add_argument("--n", type=int, default=N_SCORE, help="samples per score")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="classifier training seeds (digits)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="quality_sanity")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    datasets = [load_dataset("digits")]
    if args.mnist_dir != "none" and Path(args.mnist_dir).is_dir():
        datasets.append(load_dataset("mnist", data_dir=args.mnist_dir))
    results = {}
    with tempfile.TemporaryDirectory(prefix="mdmsearch-quality-") as cache:
        os.environ["MDMSEARCH_CACHE"] = cache  # fresh cache: every classifier is trained (and timed) here
        for data in datasets:
            seeds = args.seeds if data.name == "digits" else [0]
            results[data.name] = {"sizes": data.sizes(), "source": data.meta.get("source"),
                                  **run_dataset(data, args.n, seeds)}
    fid_timing = fid_2048_timing()
    payload = {"n": args.n, "threads": args.threads, "noise_sigmas": NOISE_SIGMAS, "datasets": results,
               "fid_2048": fid_timing}
    print(write(args.name, payload, markdown(results, fid_timing)))


if __name__ == "__main__":
    main()
