"""Unit tests for the sample-quality metrics beyond the Fréchet distance: KID, classifier IS,
k-NN precision/recall, density/coverage and the memorization ratio. Synthetic data with known
answers (identical sets, far shifts, a generator that emits only one of ten clusters)."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable

import numpy as np
import pytest

from gan.metrics import (
    classifier_inception_score,
    density_coverage,
    kernel_inception_distance,
    memorization_ratio,
    precision_recall,
)

# --------------------------------------------------------------------------- KID


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook unbiased MMD² with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.product(range(m), repeat=2) if i != j)
    yy = sum(k(y[i], y[j]) for i, j in itertools.product(range(m), repeat=2) if i != j)
    xy = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_reference_on_one_full_subset() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 4))
    b = rng.standard_normal((30, 4)) * 1.3 + 0.4
    expected = _reference_mmd2(a, b)
    assert expected > 0.1  # a real difference, not a trivially zero case
    # One subset of all rows is a permutation of each set; the estimator is order-invariant.
    mean, std = kernel_inception_distance(a, b, subsets=1, subset_size=30)
    assert mean == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert std == 0.0
    # subset_size larger than the sets is clipped to min(len(a), len(b)), not an error.
    clipped, _ = kernel_inception_distance(a, b, subsets=1, subset_size=10_000)
    assert clipped == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_kid_identical_small_shifted_large_and_monotone() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1000, 8))
    b = rng.standard_normal((1000, 8))
    same, _ = kernel_inception_distance(a, a)
    shifted = [kernel_inception_distance(a, b + s)[0] for s in (0.5, 1.0, 2.0)]
    assert shifted[0] > 0.5  # measured ~1.1
    assert shifted[0] < shifted[1] < shifted[2]
    # Identical sets still give a small nonzero value: independent subsets overlap a little.
    assert abs(same) < 1e-3 * shifted[2]
    assert abs(same) < 1e-2 * shifted[1]


def test_kid_is_unbiased_for_independent_samples_of_one_distribution() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2000, 8))
    b = rng.standard_normal((2000, 8))
    subsets = 50
    mean, std = kernel_inception_distance(a, b, subsets=subsets, subset_size=100, seed=3)
    assert std > 0.0
    # Within 3 standard errors of 0; the biased (V-statistic) estimator would sit near
    # 2 (E k(x,x) - E k(x,y)) / m ~ 0.17 here, far outside this band.
    assert abs(mean) < 3.0 * std / np.sqrt(subsets)
    assert abs(mean) < 0.05


def test_kid_is_deterministic_given_seed() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((300, 5)) + 0.2
    assert kernel_inception_distance(a, b, seed=7) == kernel_inception_distance(a, b, seed=7)
    assert kernel_inception_distance(a, b, seed=7) != kernel_inception_distance(a, b, seed=8)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (np.zeros(10), np.zeros((10, 1)), {}, "2-D"),
        (np.zeros((10, 3)), np.zeros((10, 4)), {}, "dimensions differ"),
        (np.zeros((1, 3)), np.zeros((10, 3)), {}, "at least 2 rows"),
        (np.zeros((10, 3)), np.full((10, 3), np.inf), {}, "NaN or infinite"),
        (np.zeros((10, 3)), np.zeros((10, 3)), {"subsets": 0}, "subsets"),
        (np.zeros((10, 3)), np.zeros((10, 3)), {"subset_size": 1}, "subset_size"),
    ],
)
def test_kid_rejects_bad_input(a: np.ndarray, b: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kernel_inception_distance(a, b, **kwargs)


# --------------------------------------------------------------------------- classifier IS


@pytest.mark.parametrize("num_classes", [2, 10])
def test_inception_score_confident_and_evenly_spread_is_num_classes(num_classes: int) -> None:
    # 5 splits of 20 samples each hold every class equally often.
    probabilities = np.eye(num_classes)[np.arange(100) % num_classes]
    mean, std = classifier_inception_score(probabilities, splits=5)
    assert mean == pytest.approx(num_classes, abs=1e-6)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_is_one_without_diversity_or_confidence() -> None:
    one_class = np.eye(10)[np.full(100, 3)]
    assert classifier_inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-9)
    uniform = np.full((100, 10), 0.1)
    assert classifier_inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_intermediate_case_matches_closed_form() -> None:
    # Two classes, each prediction 0.9 on its class, classes alternate: p(y) = (0.5, 0.5) and
    # KL = 0.9 log(1.8) + 0.1 log(0.2) for every sample.
    p = np.tile([[0.9, 0.1], [0.1, 0.9]], (50, 1))
    expected = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
    mean, std = classifier_inception_score(p, splits=5)  # 20 rows each: p(y) stays (0.5, 0.5)
    assert 1.0 < mean < 2.0
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        classifier_inception_score(np.array([[2.0, 1.0, 3.0]] * 10))  # logits
    with pytest.raises(ValueError, match="non-negative"):
        classifier_inception_score(np.array([[1.5, -0.5]] * 10))
    with pytest.raises(ValueError, match="finite"):
        classifier_inception_score(np.array([[np.nan, 1.0]] * 10))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classifier_inception_score(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="splits"):
        classifier_inception_score(np.eye(3), splits=4)
    with pytest.raises(ValueError, match="splits"):
        classifier_inception_score(np.eye(3), splits=0)


# --------------------------------------------------------------------------- k-NN metrics


def _ten_clusters(seed: int, per_cluster: int = 50, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """10 unit-variance Gaussian clusters with centres ~N(0, 10^2 I): far apart in 8-D."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, dim)) * 10.0
    real = np.concatenate([c + rng.standard_normal((per_cluster, dim)) for c in centres])
    return centres, real


def _one_class_generator(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real: 10 clusters x 50 points; fake: 500 points from cluster 0 only (mode collapse).

    The fake cluster is a little sharper (std 0.7) than the real one, as collapsed GANs tend to
    produce typical samples. With the full std 1, 50 real points in 8-D make the k=3 balls
    cover only ~75-90 % of cluster 0 (the known finite-sample underestimate of k-NN
    precision), which says nothing about mode collapse.
    """
    centres, real = _ten_clusters(seed)
    rng = np.random.default_rng(seed + 100)
    fake = centres[0] + 0.7 * rng.standard_normal((500, real.shape[1]))
    return real, fake


def test_precision_uses_kth_neighbour_radius_excluding_self() -> None:
    # Real points on a line with gaps 1, 2, 3, 4. Radii (self excluded):
    # k=1: 1, 1, 2, 3, 4;  k=2: 3, 2, 3, 4, 7.
    real = np.array([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]
    fake = np.array([-2.5, 4.5, 13.5, 20.0])[:, None]
    # k=1: only 4.5 (1.5 from 3) and 13.5 (3.5 from 10) are inside; k=2 adds -2.5 (2.5 from 0).
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert precision_recall(real, fake, k=2) == (0.75, 1.0)


def test_precision_recall_identical_sets_are_perfect() -> None:
    _, real = _ten_clusters(10)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)


def test_precision_recall_far_shift_is_zero() -> None:
    _, real = _ten_clusters(11)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)


def test_precision_recall_one_class_generator() -> None:
    real, fake = _one_class_generator(12)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9  # the samples are realistic ...
    assert recall < 0.2  # ... but reproduce one cluster in ten (at most 0.1 of the real rows)
    # Swapping the roles swaps the answer: the metric is not symmetric.
    swapped_precision, swapped_recall = precision_recall(fake, real)
    assert swapped_precision == pytest.approx(recall)
    assert swapped_recall == pytest.approx(precision)


def test_density_coverage_identical_sets() -> None:
    _, real = _ten_clusters(13)
    density, coverage = density_coverage(real, real.copy())
    assert coverage == 1.0
    # Open balls: each real ball holds its own copy and its k-1 nearer neighbours -> exactly 1.
    assert density == pytest.approx(1.0, abs=0.02)


def test_density_coverage_one_class_generator() -> None:
    real, fake = _one_class_generator(14)
    density, coverage = density_coverage(real, fake)
    assert coverage == pytest.approx(0.1, abs=0.05)
    assert density > 1.0  # samples packed in the dense middle of a real cluster
    far_density, far_coverage = density_coverage(real, real + 1000.0)
    assert (far_density, far_coverage) == (0.0, 0.0)


def test_knn_metrics_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Self-exclusion and the row offsets must be right in every chunk, not just the first."""
    real, fake = _one_class_generator(15)
    expected = (precision_recall(real, fake), density_coverage(real, fake))
    # The module, not the same-named function that gan.metrics re-exports.
    module = importlib.import_module("gan.metrics.precision_recall")
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 7 * len(real) - 3)  # ragged chunks of ~6 rows
    assert (precision_recall(real, fake), density_coverage(real, fake)) == expected


@pytest.mark.parametrize("metric", [precision_recall, density_coverage])
def test_knn_metrics_reject_bad_input(metric: Callable[..., tuple[float, float]]) -> None:
    good = np.zeros((20, 3)) + np.arange(20)[:, None]
    with pytest.raises(ValueError, match="2-D"):
        metric(good[:, 0], good)
    with pytest.raises(ValueError, match="dimensions differ"):
        metric(good, good[:, :2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric(good, np.where(good > 5, np.nan, good))
    with pytest.raises(ValueError, match="at least"):
        metric(good[:3], good)  # real needs more than k rows
    with pytest.raises(ValueError, match="k must be"):
        metric(good, good, k=0)


# --------------------------------------------------------------------------- memorization


def test_memorization_ratio_flags_copies() -> None:
    rng = np.random.default_rng(20)
    train = rng.standard_normal((500, 64))
    holdout = rng.standard_normal((300, 64))
    copies = train[rng.choice(500, 300, replace=False)] + 1e-6 * rng.standard_normal((300, 64))
    result = memorization_ratio(train, holdout, copies)
    assert set(result) == {"sample_to_train", "holdout_to_train", "ratio"}
    assert result["sample_to_train"] < 1e-4
    assert result["holdout_to_train"] > 1.0  # fresh 64-D points are far from every train point
    assert result["ratio"] == pytest.approx(result["sample_to_train"] / result["holdout_to_train"])
    assert result["ratio"] < 0.1


def test_memorization_ratio_is_about_one_for_fresh_samples() -> None:
    rng = np.random.default_rng(21)
    train = rng.standard_normal((500, 64))
    holdout = rng.standard_normal((300, 64))
    samples = rng.standard_normal((300, 64))
    assert 0.7 < memorization_ratio(train, holdout, samples)["ratio"] < 1.4


def test_memorization_ratio_rejects_bad_input() -> None:
    rng = np.random.default_rng(22)
    train, holdout = rng.standard_normal((50, 4)), rng.standard_normal((20, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        memorization_ratio(train, holdout, rng.standard_normal((20, 5)))
    with pytest.raises(ValueError, match="2-D"):
        memorization_ratio(train, holdout, rng.standard_normal((20, 2, 2)))
    with pytest.raises(ValueError, match="at least 1 rows"):
        memorization_ratio(train, holdout[:0], holdout)
    with pytest.raises(ValueError, match="NaN or infinite"):
        memorization_ratio(train, holdout, np.full((20, 4), np.inf))
    with pytest.raises(ValueError, match="duplicates training rows"):
        memorization_ratio(train, train[:20], holdout)
