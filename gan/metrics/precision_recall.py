"""Improved precision and recall of generated samples (Kynkäänniemi et al. 2019).

A single number such as the Fréchet distance cannot tell "samples look bad" (low fidelity) from
"samples look fine but miss part of the data" (low diversity, e.g. mode collapse). This metric
separates the two by estimating each distribution's support as a union of balls: every point gets
a ball whose radius is the distance to its k-th nearest neighbour within its own set (itself
excluded). Precision is the fraction of generated samples inside the real manifold; recall is the
fraction of real samples inside the generated manifold. Balls are closed (``<=``), as in the
authors' reference code.

The nearest-neighbour helpers here are shared with `density_coverage` and `memorization`.
Distances are exact (no approximate index), computed in float64 with `torch.cdist` in row chunks
so that memory stays bounded (about 32 MiB per chunk) for tens of thousands of points.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gan.metrics.checks import check_feature_set, check_same_dimension

CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries per chunk: 4M float64 = 32 MiB


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def distance_chunks(query: np.ndarray, reference: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, D) with D[i, j] = ||query[start + i] - reference[j]||, in float64 row chunks.

    The chunking depends only on the two arrays' sizes, so the same query rows against equal
    reference arrays give bitwise equal distances: a point's own ball radius and its distance to
    a copy of its k-th neighbour compare consistently (this keeps the identical-sets cases exact).
    """
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float64))
    r = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    step = max(1, CHUNK_ELEMENTS // max(1, r.shape[0]))
    with torch.no_grad():
        for start in range(0, q.shape[0], step):
            yield start, torch.cdist(q[start : start + step], r)


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row of the same array (self excluded).

    Self is excluded by index, not by a zero distance, so duplicated rows count as neighbours
    (their radius can be 0) and round-off in the self-distance cannot matter. Needs k < N.
    """
    n = features.shape[0]
    if k >= n:
        raise ValueError(f"k={k} needs more than k rows, got {n}")
    radii = np.empty(n, dtype=np.float64)
    for start, dist in distance_chunks(features, features):
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = torch.inf
        radii[start : start + dist.shape[0]] = torch.kthvalue(dist, k, dim=1).values.numpy()
    return radii


def nearest_neighbour_distances(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance from each query row to its nearest reference row."""
    out = np.empty(query.shape[0], dtype=np.float64)
    for start, dist in distance_chunks(query, reference):
        out[start : start + dist.shape[0]] = dist.min(dim=1).values.numpy()
    return out


def _fraction_inside(manifold: np.ndarray, radii: np.ndarray, points: np.ndarray) -> float:
    """Fraction of `points` within distance radii[i] (closed ball) of some manifold[i]."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    radii_t = torch.from_numpy(radii)
    for start, dist in distance_chunks(manifold, points):
        inside |= (dist <= radii_t[start : start + dist.shape[0], None]).any(dim=0)
    return float(inside.double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real`, both (N, D) feature arrays, in [0, 1].

    precision: fraction of fake rows inside the union of closed balls around the real rows with
    radius = distance to the k-th nearest other real row (fidelity: are samples realistic?).
    recall: fraction of real rows inside the same construction built on the fake rows (diversity:
    is all of the data reproduced?). k=3 is the paper's recommendation. Cost is O(N M D) time
    and O(chunk) memory. Raises ValueError on non-2-D or non-finite input, mismatched feature
    dimensions, k < 1, or a set with k or fewer rows.
    """
    check_k(k)
    r = check_feature_set("real", real, min_rows=k + 1)
    f = check_feature_set("fake", fake, min_rows=k + 1)
    check_same_dimension(real=r, fake=f)
    precision = _fraction_inside(r, knn_radii(r, k), f)
    recall = _fraction_inside(f, knn_radii(f, k), r)
    return precision, recall
