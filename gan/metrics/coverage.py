"""Class-level summaries of generated samples, from the classifier's probabilities.

Coverage counts how many classes a generator actually produces (mode collapse shows as a low
count); mean confidence says how recognisable the samples are to the classifier.
"""

from __future__ import annotations

import numpy as np

ROW_SUM_ATOL = 1e-3


def check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Class probabilities as float64 (N, C), refusing logits, NaN and empty input."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probabilities must be a non-empty (N, C) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=ROW_SUM_ATOL):
        raise ValueError(
            "each row of probabilities must sum to 1 (pass softmax output, not logits)"
        )
    return p


def class_coverage(probabilities: np.ndarray, *, min_fraction: float = 0.01) -> int:
    """Number of classes that receive at least `min_fraction` of the argmax predictions."""
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    p = check_probabilities(probabilities)
    counts = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
    return int((counts / p.shape[0] >= min_fraction).sum())


def mean_confidence(probabilities: np.ndarray) -> float:
    """Mean over samples of the top class probability."""
    p = check_probabilities(probabilities)
    return float(p.max(axis=1).mean())
