"""Sample-quality metrics: a small classifier as feature extractor, Fréchet distance, class
coverage and confidence, and two baseline generators to compare against: one Gaussian and a
Gaussian mixture."""

from gan.metrics.classifier import DigitClassifier, classifier_accuracy, train_classifier
from gan.metrics.coverage import class_coverage, mean_confidence
from gan.metrics.density_coverage import density_coverage
from gan.metrics.evaluate import evaluate_samples
from gan.metrics.frechet import frechet_distance, frechet_distance_from_moments
from gan.metrics.gaussian_baseline import GaussianBaseline, fit_gaussian
from gan.metrics.gaussian_mixture import GaussianMixtureBaseline, fit_gaussian_mixture
from gan.metrics.inception import FIDInceptionV3, InceptionWeightsError, load_inception_extractor
from gan.metrics.inception_score import classifier_inception_score
from gan.metrics.kid import kernel_inception_distance
from gan.metrics.memorization import memorization_ratio
from gan.metrics.precision_recall import precision_recall

__all__ = [
    "DigitClassifier",
    "FIDInceptionV3",
    "GaussianBaseline",
    "GaussianMixtureBaseline",
    "InceptionWeightsError",
    "class_coverage",
    "classifier_accuracy",
    "classifier_inception_score",
    "density_coverage",
    "evaluate_samples",
    "fit_gaussian",
    "fit_gaussian_mixture",
    "frechet_distance",
    "frechet_distance_from_moments",
    "kernel_inception_distance",
    "load_inception_extractor",
    "mean_confidence",
    "memorization_ratio",
    "precision_recall",
    "train_classifier",
]
