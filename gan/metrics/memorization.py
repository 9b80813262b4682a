"""Memorization check: are generated samples closer to the training images than new data is?

A generator that copies (or nearly copies) training images scores well on fidelity metrics while
having learnt nothing general. Nearest-neighbour distance to the training set exposes it, but a
raw distance has no scale, so it is compared with the same distance for held-out real images that
the model never saw: ``ratio = median_s d(s, train) / median_h d(h, train)``. A ratio around 1
means samples are as far from the training set as fresh data is; well below 1 means samples sit
closer to training images than unseen real images do, i.e. memorization. (Well above 1 means the
samples are off the data manifold, a fidelity rather than a memorization problem.) Medians make
the summary robust to a few outliers. Inputs may be classifier features or flattened pixels.
"""

from __future__ import annotations

import numpy as np

from gan.metrics.checks import check_feature_set, check_same_dimension
from gan.metrics.precision_recall import (
    nearest_neighbour_distances,
)


def memorization_ratio(
    train: np.ndarray, holdout: np.ndarray, samples: np.ndarray
) -> dict[str, float]:
    """Median nearest-training-neighbour distances of samples and of held-out data, and their ratio.

    `train`, `holdout` and `samples` are (N, D) arrays (features or flattened pixels) with the same
    D; `holdout` must be real data disjoint from `train`. Returns {"sample_to_train": median over
    samples of the Euclidean distance to the nearest train row, "holdout_to_train": the same for
    holdout rows, "ratio": sample_to_train / holdout_to_train}. Raises ValueError on non-2-D or
    non-finite input, empty sets, mismatched dimensions, or a zero holdout distance (holdout rows
    duplicating training rows, which leaves nothing to compare against).
    """
    tr = check_feature_set("train", train, min_rows=1)
    ho = check_feature_set("holdout", holdout, min_rows=1)
    sa = check_feature_set("samples", samples, min_rows=1)
    check_same_dimension(train=tr, holdout=ho, samples=sa)
    sample_to_train = float(np.median(nearest_neighbour_distances(sa, tr)))
    holdout_to_train = float(np.median(nearest_neighbour_distances(ho, tr)))
    if holdout_to_train <= 0.0:
        raise ValueError(
            "median holdout-to-train distance is 0: the holdout set duplicates training rows; "
            "use real data disjoint from the training set"
        )
    return {
        "sample_to_train": sample_to_train,
        "holdout_to_train": holdout_to_train,
        "ratio": sample_to_train / holdout_to_train,
    }
