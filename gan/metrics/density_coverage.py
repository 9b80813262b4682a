"""Density and coverage of generated samples (Naeem et al. 2020, "Reliable Fidelity and Diversity
Metrics for Generative Models").

They fix two weaknesses of k-NN precision and recall: one real outlier has a huge k-NN ball that
can swallow many bad samples (inflating precision), and recall builds balls around the *fake*
samples, so it inherits the generator's outliers. Both new metrics only use balls around real
samples (radius = distance to the k-th nearest other real sample):

* density: how many real balls contain each fake sample, on average, divided by k. It rewards
  samples in dense regions of the real data, is about 1 when the distributions match (exactly 1
  for identical sets) and is not capped at 1.
* coverage: the fraction of real balls that contain at least one fake sample, in [0, 1]; a
  generator that drops modes leaves their balls empty.

Balls are open (``<``), as in the authors' reference code (``prdc``).
"""

from __future__ import annotations

import numpy as np
import torch

from gan.metrics.checks import check_feature_set, check_same_dimension
from gan.metrics.precision_recall import (
    check_k,
    distance_chunks,
    knn_radii,
)


def density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> tuple[float, float]:
    """(density, coverage) of `fake` against `real`, both (N, D) feature arrays.

    density = sum over fake j and real i of [d(real_i, fake_j) < r_i] / (k * M) and
    coverage = mean over real i of [min_j d(real_i, fake_j) < r_i], where r_i is the distance from
    real_i to its k-th nearest other real row and M the number of fake rows. k=5 is the paper's
    default. Raises ValueError on non-2-D or non-finite input, mismatched feature dimensions,
    k < 1, more than k rows missing in `real`, or an empty `fake`.
    """
    check_k(k)
    r = check_feature_set("real", real, min_rows=k + 1)
    f = check_feature_set("fake", fake, min_rows=1)
    check_same_dimension(real=r, fake=f)
    radii = torch.from_numpy(knn_radii(r, k))

    inside_count = 0
    covered = 0
    for start, dist in distance_chunks(r, f):
        inside = dist < radii[start : start + dist.shape[0], None]
        inside_count += int(inside.sum())
        covered += int(inside.any(dim=1).sum())
    density = inside_count / (k * f.shape[0])
    coverage = covered / r.shape[0]
    return float(density), float(coverage)
