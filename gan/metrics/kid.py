"""Kernel Inception Distance (KID) between two feature sets, on our own classifier features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the squared maximum mean discrepancy
between the two feature distributions under the cubic polynomial kernel
``k(x, y) = (x . y / d + 1) ** 3``. Unlike the Fréchet distance it assumes no Gaussian shape and
its estimator is *unbiased*, so it is comparable across sample sizes and small sets (a few hundred
images) give meaningful, if noisy, values; that noise is why it is averaged over random subsets and
reported with its spread. Follows torch-fidelity's implementation (same kernel, same unbiased
MMD² estimator, mean and population std over subsets).
"""

from __future__ import annotations

import numpy as np

from gan.metrics.checks import check_feature_set, check_same_dimension

MIN_ROWS = 2  # the unbiased estimator divides by m (m - 1)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel matrix ``(x @ y.T / d + 1) ** 3`` for (n, d) and (m, d) arrays."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² estimate between two equally sized samples (m, d) under the cubic kernel.

    The within-set sums leave out the diagonal k(x_i, x_i), which is what removes the bias; the
    price is that the estimate can be (slightly) negative when the distributions match.
    """
    m = x.shape[0]
    if y.shape[0] != m:
        raise ValueError(f"both samples must have the same size, got {m} and {y.shape[0]}")
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    subsets: int = 10,
    subset_size: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two (N, D) feature arrays: (mean, std) of the unbiased MMD² over subsets.

    Each of `subsets` rounds draws `subset_size` rows without replacement from each set (with a
    `numpy.random.default_rng(seed)` generator, so the result is deterministic) and computes the
    unbiased MMD² with the cubic polynomial kernel. `subset_size` is clipped to
    ``min(len(features_a), len(features_b))``: with fewer rows than asked for, every round uses all
    rows of the smaller set (so a single round on equal-size sets is the full-sample estimate)
    instead of failing. The std is the population std (ddof=0) over rounds, as in torch-fidelity.

    Lower is better; the true value is 0 for identical distributions, and the estimate scatters
    around 0 (negative values included) when they match. Raises ValueError on non-2-D or non-finite
    input, mismatched feature dimensions, fewer than 2 rows, or non-positive `subsets` or
    `subset_size` < 2.
    """
    estimator = " for the unbiased MMD² estimator"
    a = check_feature_set("features_a", features_a, min_rows=MIN_ROWS, purpose=estimator)
    b = check_feature_set("features_b", features_b, min_rows=MIN_ROWS, purpose=estimator)
    check_same_dimension(features_a=a, features_b=b)
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets!r}")
    if subset_size < MIN_ROWS:
        raise ValueError(f"subset_size must be at least {MIN_ROWS}, got {subset_size!r}")
    m = min(subset_size, a.shape[0], b.shape[0])

    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())
