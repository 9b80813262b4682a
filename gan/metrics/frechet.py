"""Fréchet distance between two feature sets (the "FID" formula, on our own classifier features).

Follows the reference pytorch-fid implementation, including its handling of a singular covariance
product and of the spurious imaginary part that `scipy.linalg.sqrtm` can return.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from gan.metrics.checks import check_feature_set, check_same_dimension

EPS = 1e-6
IMAG_ATOL = 1e-3


def frechet_distance_from_moments(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps: float = EPS
) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 sqrtm(Sa Sb)) for two Gaussians given by their moments."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a = np.atleast_2d(sigma_a).astype(np.float64)
    sigma_b = np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError("the two distributions must have the same dimension")
    if sigma_a.shape != (mu_a.shape[0], mu_a.shape[0]):
        raise ValueError("covariance shape does not match the mean")

    diff = mu_a - mu_b
    with warnings.catch_warnings():
        # A singular product makes sqrtm warn; the finiteness check below is what decides.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma_a.shape[0]) * eps
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("sqrtm of the covariance product is not finite, even with an offset")

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(
                f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm is too large"
            )
        covmean = covmean.real

    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    # The true distance is non-negative; only round-off can push it below zero.
    return float(max(value, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted (float64) to two (N, D) feature arrays.

    Lower is better; 0 means identical first and second moments. Raises ValueError on non-2-D
    input, mismatched feature dimensions or fewer than 2 rows per set.
    """
    covariance = " to estimate a covariance"
    a = check_feature_set("features_a", features_a, min_rows=2, purpose=covariance)
    b = check_feature_set("features_b", features_b, min_rows=2, purpose=covariance)
    check_same_dimension(features_a=a, features_b=b)
    return frechet_distance_from_moments(
        a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False)
    )
