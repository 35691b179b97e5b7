"""Evaluation: FID/KID through torch-fidelity, and a small classifier whose features score small image sets."""

from flexar.eval.classifier import CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor, ClassifierModule, DigitClassifier
from flexar.eval.fid import (
    FeatureExtractor,
    SmallSetWarning,
    compute_metrics,
    extract_features,
    frechet_distance,
    gaussian_statistics,
    load_extractor,
)
from flexar.eval.reconstruction import reconstruction_metrics

__all__ = [
    "CLASSIFIER_EXTRACTOR",
    "ClassifierFeatureExtractor",
    "ClassifierModule",
    "DigitClassifier",
    "FeatureExtractor",
    "SmallSetWarning",
    "compute_metrics",
    "extract_features",
    "frechet_distance",
    "gaussian_statistics",
    "load_extractor",
    "reconstruction_metrics",
]
