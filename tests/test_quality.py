"""Sample quality (mdmsearch.quality): the digits classifier, its cache, KID/FID and their
sanity checks, and the Inception extractor's offline failure. Everything runs on digits or
synthetic features; nothing is downloaded."""

import json
import math

import numpy as np
import pytest
import torch

from mdmsearch.data import DataBundle, load_dataset
from mdmsearch.errors import MDMError
from mdmsearch.quality import (
    QualityError,
    clear_classifier_memory,
    clear_reference_memory,
    fid,
    get_classifier,
    get_extractor,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    reference_pixels,
    score_samples,
    split_labels,
)
from mdmsearch.quality import classifier as classifier_mod
from mdmsearch.quality import inception as inception_mod
from mdmsearch.quality.degrade import degrade

N_SCORE = 270  # the digits test split


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private classifier cache for this module (``$MDMSEARCH_CACHE``), empty at the start."""
    path = tmp_path_factory.mktemp("quality-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MDMSEARCH_CACHE", str(path))
        clear_classifier_memory()
        clear_reference_memory()
        yield path
    clear_classifier_memory()
    clear_reference_memory()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trainings(cache, digits):
    """Counts the trainings of this module: wraps the private training function."""
    calls = []
    real = classifier_mod._train

    def counted(data, spec):
        calls.append(data.name)
        return real(data, spec)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classifier_mod, "_train", counted)
        yield calls


@pytest.fixture(scope="module")
def clf(cache, digits, trainings):
    return get_classifier(digits)


@pytest.fixture(scope="module")
def real_score(clf, digits):
    return score_samples(digits.test, digits, seed=0)


def _assert_one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- classifier and cache


def test_labels_are_recovered_for_every_digits_split(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    for split in ("train", "val", "test"):
        y = split_labels(digits, split)
        assert y.shape == (digits.split(split).shape[0],)
        # every image's label is the label sklearn gives that image
        first = digits.split(split)[0, 0].numpy()
        match = [int(t) for img, t in zip(raw.images.astype(np.uint8), raw.target) if (img == first).all()]
        assert match == [int(y[0])]
        assert set(y.tolist()) == set(range(10))


def test_classifier_accuracy_and_features(clf, digits, trainings):
    assert clf.trained_now and trainings == ["digits"]
    assert clf.accuracy >= 0.97, clf.accuracy
    assert clf.path.is_file() and clf.path.parent == classifier_mod.cache_dir()
    feats = clf(digits.test)
    assert feats.dtype == np.float64 and feats.shape == (digits.test.shape[0], clf.active.numel())
    assert np.sqrt(np.mean(clf(digits.train) ** 2)) == pytest.approx(1.0, rel=1e-6)  # unit RMS on train
    assert clf.name.startswith("classifier-digits-") and clf.key.startswith(clf.name.rsplit("-", 1)[1])


def test_the_cache_is_reused_across_processes(clf, digits, trainings):
    mtime = clf.path.stat().st_mtime_ns
    clear_classifier_memory()  # what a new process sees: only the disk cache
    again = get_classifier(digits)
    assert not again.trained_now and again is not clf
    assert trainings == ["digits"]  # no second training
    assert clf.path.stat().st_mtime_ns == mtime
    assert again.accuracy == clf.accuracy
    torch.testing.assert_close(again.net.state_dict(), clf.net.state_dict(), rtol=0, atol=0)
    assert get_classifier(digits) is again  # and kept in memory


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign-key"])
def test_a_damaged_cache_file_is_retrained(clf, digits, trainings, damage, caplog):
    path = clf.path
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        payload = torch.load(path, weights_only=True)
        payload["key"] = "0" * 64
        torch.save(payload, path)
    before = len(trainings)
    clear_classifier_memory()
    fresh = get_classifier(digits)
    assert fresh.trained_now and len(trainings) == before + 1
    assert "retraining" in caplog.text
    # deterministic training: the retrained weights are the cached ones, and the file is whole again
    torch.testing.assert_close(fresh.net.state_dict(), clf.net.state_dict(), rtol=0, atol=0)
    clear_classifier_memory()
    assert not get_classifier(digits).trained_now


def test_the_cache_key_follows_the_training_data_and_the_spec(clf, digits):
    from mdmsearch.quality import ClassifierSpec, classifier_key

    assert classifier_key(digits) == clf.key
    assert classifier_key(digits, ClassifierSpec(hidden=64)) != clf.key
    other = load_dataset("digits", seed=1)  # another split: other training pixels
    assert classifier_key(other) != clf.key


def test_unlabelled_datasets_fail_in_one_line(cache, digits):
    bundle = DataBundle("mystery", digits.shape, digits.levels, digits.train, digits.val, digits.test)
    with pytest.raises(QualityError) as info:
        get_classifier(bundle)
    assert "no labels known for dataset 'mystery'" in _assert_one_line(info.value)


# --------------------------------------------------------------------------- scores on real and corrupted digits


def test_held_out_real_digits_score_near_zero(real_score, clf):
    json.dumps(real_score)  # JSON-able
    assert set(real_score) >= {"kid", "kid_se", "fid", "n", "n_ref", "features", "classifier_acc"}
    assert real_score["n"] == N_SCORE and real_score["n_ref"] == 1257  # the whole digits training split
    assert real_score["features"] == clf.name and real_score["classifier_acc"] == clf.accuracy
    assert 0 < real_score["kid_se"] < 0.05
    assert abs(real_score["kid"]) < 3 * real_score["kid_se"], real_score
    assert real_score["fid"] < 5.0, real_score


def test_another_held_out_split_also_scores_near_zero(clf, digits):
    res = score_samples(digits.val, digits, seed=3)
    assert abs(res["kid"]) < 3 * res["kid_se"], res


@pytest.mark.parametrize("kind,strength", [("uniform", 1.0), ("blur", 1.0), ("shuffle", 1.0)])
def test_noise_blur_and_shuffled_pixels_score_far_worse(real_score, digits, kind, strength):
    bad = score_samples(degrade(digits.test, digits.levels, kind, strength), digits, seed=0)
    assert bad["kid"] > real_score["kid"] + 10 * bad["kid_se"], (kind, bad)
    assert bad["kid"] > 10 * real_score["kid_se"]
    assert bad["fid"] > 8 * real_score["fid"], (kind, bad)


def test_scores_grow_monotonically_with_added_noise(real_score, digits):
    sigmas = [0.1, 0.2, 0.3, 0.5]
    scores = [score_samples(degrade(digits.test, digits.levels, "gaussian", s, seed=7), digits) for s in sigmas]
    kids = [real_score["kid"]] + [s["kid"] for s in scores]
    fids = [real_score["fid"]] + [s["fid"] for s in scores]
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert scores[-1]["kid"] > 10 * scores[-1]["kid_se"]


def test_same_seed_same_reference_and_same_score(clf, digits):
    a, b = reference_pixels(digits, 300, seed=5), reference_pixels(digits, 300, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, reference_pixels(digits, 300, seed=6))
    rows = {r.numpy().tobytes() for r in digits.train}
    assert all(r.numpy().tobytes() in rows for r in a) and len({r.numpy().tobytes() for r in a}) == 300
    x = digits.test[:100].to(torch.int64)
    s1 = score_samples(x, digits, n_ref=300, seed=5)
    s2 = score_samples(x, digits, n_ref=300, seed=5)
    s1.pop("seconds"), s2.pop("seconds")
    assert s1 == s2 and s1["n_ref"] == 300


@pytest.mark.parametrize("bad,why", [
    (torch.zeros(10, 1, 8, 8), "integers"),
    (torch.zeros(10, 1, 7, 8, dtype=torch.int64), "pixels must be [N, 1, 8, 8]"),
    (torch.full((10, 1, 8, 8), 17, dtype=torch.int64), "must lie in [0, 16]"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.int64), "at least 4 samples"),
])
def test_bad_pixels_fail_in_one_line(cache, digits, bad, why):
    with pytest.raises(QualityError) as info:
        score_samples(bad, digits, features="classifier")
    assert why in _assert_one_line(info.value)


def test_unknown_features_and_continuous_data_fail_in_one_line(cache, digits):
    with pytest.raises(QualityError, match="unknown features 'vgg'"):
        score_samples(digits.test, digits, features="vgg")
    gauss = load_dataset("gaussian", n_train=50, n_val=10, n_test=10)
    with pytest.raises(QualityError) as info:
        score_samples(torch.zeros(10, *gauss.shape, dtype=torch.int64), gauss)
    assert "needs an image dataset" in _assert_one_line(info.value)


# --------------------------------------------------------------------------- KID and FID on known distributions


def _kid_ref(x, y):
    """Direct O(n^2) loops-free but formula-literal unbiased MMD^2 (for the row-sum implementation)."""
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    n, m = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_mmd2_and_its_jackknife_match_the_definitions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    value, se = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert value == pytest.approx(_kid_ref(x, y), rel=1e-12)
    loo_x = np.array([_kid_ref(np.delete(x, i, 0), y) for i in range(len(x))])
    loo_y = np.array([_kid_ref(x, np.delete(y, j, 0)) for j in range(len(y))])
    var = 8 / 9 * ((loo_x - loo_x.mean()) ** 2).sum() + 6 / 7 * ((loo_y - loo_y.mean()) ** 2).sum()
    assert se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert polynomial_kernel(x[:1], y[:1])[0, 0] == pytest.approx((x[0] @ y[0] / 3 + 1) ** 3)


def test_kid_is_unbiased_and_its_se_is_honest_on_gaussians():
    rng = np.random.default_rng(1)
    same = kid(rng.normal(size=(300, 16)), rng.normal(size=(1000, 16)))
    assert abs(same["kid"]) < 3 * same["kid_se"], same
    shifted = kid(rng.normal(0.3, 1.0, size=(300, 16)), rng.normal(size=(1000, 16)))
    assert shifted["kid"] > 5 * shifted["kid_se"], shifted
    # over many repetitions: mean ~ 0 (the biased V-statistic would be ~ +2/n * E k(x, x) too high)
    # and the SE covers the spread (conservative under the null, by Efron-Stein)
    reps = [kid(rng.normal(size=(40, 4)), rng.normal(size=(80, 4))) for _ in range(1000)]
    values = np.array([r["kid"] for r in reps])
    ses = np.array([r["kid_se"] for r in reps])
    assert abs(values.mean()) < 4 * values.std() / math.sqrt(len(values)), values.mean()
    assert 0.9 * values.std() < np.sqrt(np.mean(ses ** 2)) < 2.0 * values.std()
    assert np.mean(np.abs(values) > 2 * ses) < 0.08
    # different distributions: the SE is close to the actual spread
    reps = [kid(rng.normal(0.4, 1.0, size=(60, 4)), rng.normal(size=(120, 4))) for _ in range(300)]
    values = np.array([r["kid"] for r in reps])
    ses = np.array([r["kid_se"] for r in reps])
    assert 0.85 * values.std() < np.sqrt(np.mean(ses ** 2)) < 1.3 * values.std()


def test_kid_subsets_are_disjoint_and_their_se_combines():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.2, 1.0, size=(400, 8)), rng.normal(size=(800, 8))
    one = kid(x, y)
    four = kid(x, y, subsets=4)
    assert one["kid_subsets"] == 1 and four["kid_subsets"] == 4
    assert four["kid_se"] > one["kid_se"]  # fewer pairs per estimate
    assert abs(four["kid"] - one["kid"]) < 3 * four["kid_se"]
    assert kid(x, y, subset_size=250)["kid_subsets"] == 4  # ceil(800 / 250)
    with pytest.raises(QualityError):
        kid(x[:6], y, subsets=2)


def test_fid_of_identical_and_shifted_gaussians():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))  # correlated features
    assert abs(fid(x, x)["fid"]) < 1e-8
    delta = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert fid(x, x + delta)["fid"] == pytest.approx(delta @ delta, rel=1e-8)  # same covariance exactly
    # independent samples: ||mu1 - mu2||^2 plus a small positive bias of order d / N
    y = rng.normal(size=(2000, 6)) @ np.eye(6) + delta
    z = rng.normal(size=(2000, 6))
    assert fid(y, z)["fid"] == pytest.approx(delta @ delta, abs=0.1)
    assert fid(z, rng.normal(size=(2000, 6)))["fid"] < 0.05


def test_the_two_fid_methods_agree():
    from mdmsearch.quality.metrics import frechet_distance, gaussian_stats

    rng = np.random.default_rng(5)
    a, b = gaussian_stats(rng.normal(size=(500, 20))), gaussian_stats(rng.gamma(2.0, size=(500, 20)))
    assert frechet_distance(*a, *b, method="eigh") == pytest.approx(frechet_distance(*a, *b), rel=1e-9)
    with pytest.raises(QualityError, match="unknown FID method"):
        frechet_distance(*a, *b, method="svd")


def test_fid_stays_finite_for_singular_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))  # N < d: rank-deficient covariances
    value = fid(x, y)["fid"]
    assert math.isfinite(value) and value > 0


def test_metrics_reject_mismatched_features():
    with pytest.raises(QualityError, match="dimensions differ"):
        kid(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(QualityError, match="NaN"):
        fid(np.full((10, 3), np.nan), np.zeros((10, 3)))


# --------------------------------------------------------------------------- Inception (optional extra)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No Inception weights anywhere this module looks, and any download attempt fails the test."""
    monkeypatch.delenv(inception_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("MDMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    inception_mod._MODELS.clear()
    yield
    inception_mod._MODELS.clear()


def _rgb_bundle(n=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return DataBundle("rgbfake", (3, 16, 16), 256, x, x[:4], x[:4])


def test_inception_without_its_package_fails_in_one_line(no_weights, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch_fidelity"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(QualityError) as info:
        score_samples(torch.zeros(8, 3, 16, 16, dtype=torch.int64), _rgb_bundle())  # auto -> inception
    msg = _assert_one_line(info.value)
    assert "pip install" in msg and "torch-fidelity" in msg
    assert isinstance(info.value, MDMError)


def test_inception_without_weights_fails_in_one_line(no_weights, monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity")
    with pytest.raises(QualityError) as info:
        get_extractor("inception", _rgb_bundle())
    msg = _assert_one_line(info.value)
    assert inception_mod.INCEPTION_WEIGHTS_FILE in msg and str(tmp_path / "cache") in msg
    assert inception_mod.WEIGHTS_ENV in msg
    monkeypatch.setenv(inception_mod.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(QualityError, match="is not a file"):
        get_extractor("inception", _rgb_bundle())
    (tmp_path / "broken.pth").write_bytes(b"garbage")
    monkeypatch.setenv(inception_mod.WEIGHTS_ENV, str(tmp_path / "broken.pth"))
    with pytest.raises(QualityError) as info:
        get_extractor("inception", _rgb_bundle())
    assert "cannot load Inception weights" in _assert_one_line(info.value)


@pytest.fixture
def inception_weights(no_weights, monkeypatch, tmp_path):
    """An untrained Inception-v3's weights where the real ones belong (``cache_dir()``)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as mp:  # build an untrained network once to write a weights file
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "cache" / inception_mod.INCEPTION_WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    torch.save(net.state_dict(), weights)
    return weights


def test_inception_features_with_local_weights(inception_weights):
    """The plumbing, with randomly initialised weights in the expected file (nothing downloaded)."""
    data = _rgb_bundle()
    extractor = get_extractor("auto", data)
    feats = extractor(data.test.to(torch.int64))
    assert extractor.name == "inception-v3-pool3" and extractor.accuracy is None
    assert feats.shape == (4, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    gray = DataBundle("grayfake", (1, 16, 16), 17, data.train[:, :1] % 17, data.val[:, :1] % 17,
                      data.test[:, :1] % 17)
    assert get_extractor("inception", gray)(gray.test.to(torch.int64)).shape == (4, 2048)


@pytest.mark.slow
def test_score_samples_with_inception(inception_weights):
    """End to end through Inception (slow: FID's sqrtm of a 2048 x 2048 matrix takes ~10 s on one core)."""
    data = _rgb_bundle()
    res = score_samples(data.train[:6].to(torch.int64), data, n_ref=6, seed=0)
    assert res["features"] == "inception-v3-pool3" and res["classifier_acc"] is None
    assert res["n"] == 6 and res["n_ref"] == 6 and math.isfinite(res["fid"]) and math.isfinite(res["kid"])


def test_auto_picks_the_classifier_for_gray_images(clf, digits):
    assert get_extractor("auto", digits).name == clf.name  # (and inception for RGB: see above)
    with pytest.raises(QualityError, match="no choice for 2-channel"):
        get_extractor("auto", DataBundle("two", (2, 8, 8), 17, *(torch.zeros(5, 2, 8, 8, dtype=torch.uint8),) * 3))
