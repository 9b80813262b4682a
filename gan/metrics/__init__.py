"""Sample-quality metrics: a small classifier as feature extractor, Fréchet distance, class
coverage and confidence, and a Gaussian baseline generator to compare against."""

from gan.metrics.classifier import DigitClassifier, classifier_accuracy, train_classifier
from gan.metrics.coverage import class_coverage, mean_confidence
from gan.metrics.evaluate import evaluate_samples
from gan.metrics.frechet import frechet_distance, frechet_distance_from_moments
from gan.metrics.gaussian_baseline import GaussianBaseline, fit_gaussian

__all__ = [
    "DigitClassifier",
    "GaussianBaseline",
    "class_coverage",
    "classifier_accuracy",
    "evaluate_samples",
    "fit_gaussian",
    "frechet_distance",
    "frechet_distance_from_moments",
    "mean_confidence",
    "train_classifier",
]
