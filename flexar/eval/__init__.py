"""Evaluation: FID/KID through torch-fidelity, and a small classifier whose features score small image sets."""

from flexar.eval.classifier import CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor, ClassifierModule, DigitClassifier
from flexar.eval.fid import compute_metrics, extract_features, frechet_distance, gaussian_statistics
from flexar.eval.reconstruction import reconstruction_metrics

__all__ = [
    "CLASSIFIER_EXTRACTOR",
    "ClassifierFeatureExtractor",
    "ClassifierModule",
    "DigitClassifier",
    "compute_metrics",
    "extract_features",
    "frechet_distance",
    "gaussian_statistics",
    "reconstruction_metrics",
]
