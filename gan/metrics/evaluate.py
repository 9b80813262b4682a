"""One call that scores generated images against reference images with the trained classifier."""

from __future__ import annotations

import numpy as np

from gan.metrics.classifier import ArrayLike, DigitClassifier
from gan.metrics.coverage import class_coverage, mean_confidence
from gan.metrics.frechet import frechet_distance


def evaluate_samples(
    classifier: DigitClassifier,
    generated: ArrayLike,
    reference: ArrayLike,
    *,
    min_fraction: float = 0.01,
) -> dict[str, float]:
    """Return frechet_distance (classifier features), class_coverage and mean_confidence.

    Coverage and confidence are about the generated images only; the reference images only enter
    the Fréchet distance.
    """
    generated_features = classifier.features(generated).numpy().astype(np.float64)
    reference_features = classifier.features(reference).numpy().astype(np.float64)
    probabilities = classifier.predict_proba(generated).numpy().astype(np.float64)
    return {
        "frechet_distance": frechet_distance(generated_features, reference_features),
        "class_coverage": class_coverage(probabilities, min_fraction=min_fraction),
        "mean_confidence": mean_confidence(probabilities),
    }
