"""Sample quality as a measured objective next to BPD: KID (with its standard error) and FID
of generated integer pixels against a fixed, seeded reference subset of the training split,
in the feature space of a small classifier trained on the dataset itself (1-channel data)
or of Inception-v3 (3-channel data, optional ``torch-fidelity`` extra).

    from mdmsearch.quality import score_samples
    score_samples(to_pixels(x, data.levels), data)   # {"kid", "kid_se", "fid", "n", "n_ref", ...}

See docs/quality.md.
"""

from mdmsearch.quality.base import CACHE_ENV, QualityError, cache_dir
from mdmsearch.quality.classifier import (
    CLASSIFIER_VERSION,
    ClassifierSpec,
    TrainedClassifier,
    classifier_key,
    clear_classifier_memory,
    get_classifier,
)
from mdmsearch.quality.degrade import DEGRADATIONS, degrade
from mdmsearch.quality.features import AUTO_BY_CHANNELS, EXTRACTORS, FeatureExtractor, get_extractor, register_extractor
from mdmsearch.quality.inception import INCEPTION_WEIGHTS_FILE, WEIGHTS_ENV, get_inception, inception_weights_path
from mdmsearch.quality.labels import LABEL_SOURCES, register_label_source, split_labels
from mdmsearch.quality.metrics import (
    DEFAULT_SUBSET_SIZE,
    METRICS,
    fid,
    frechet_distance,
    gaussian_stats,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
)
from mdmsearch.quality.score import (
    DEFAULT_N_REF,
    clear_reference_memory,
    reference_features,
    reference_pixels,
    score_samples,
)

__all__ = [
    "AUTO_BY_CHANNELS",
    "CACHE_ENV",
    "CLASSIFIER_VERSION",
    "ClassifierSpec",
    "DEFAULT_N_REF",
    "DEFAULT_SUBSET_SIZE",
    "DEGRADATIONS",
    "EXTRACTORS",
    "FeatureExtractor",
    "INCEPTION_WEIGHTS_FILE",
    "LABEL_SOURCES",
    "METRICS",
    "QualityError",
    "TrainedClassifier",
    "WEIGHTS_ENV",
    "cache_dir",
    "classifier_key",
    "clear_classifier_memory",
    "clear_reference_memory",
    "degrade",
    "fid",
    "frechet_distance",
    "gaussian_stats",
    "get_classifier",
    "get_extractor",
    "get_inception",
    "inception_weights_path",
    "kid",
    "mmd2_unbiased",
    "polynomial_kernel",
    "reference_features",
    "reference_pixels",
    "register_extractor",
    "register_label_source",
    "score_samples",
    "split_labels",
]
