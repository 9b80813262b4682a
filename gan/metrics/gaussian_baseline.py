"""A trivial generative baseline: one multivariate Gaussian over the training pixels.

A GAN is only worth its cost if it beats this; its Fréchet distance is the "trivial baseline"
against which the real-vs-real floor and the GAN's score are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianBaseline:
    """Mean and full covariance (float64) of flattened images, with a sampling factor."""

    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)
    factor: np.ndarray  # (D, D), factor @ factor.T == cov (up to clipped negative eigenvalues)
    image_shape: tuple[int, int, int]  # (C, H, W)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Draw n images (n, C, H, W), float32, clipped to [-1, 1]; deterministic per seed."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n!r}")
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, self.mean.shape[0]))
        x = self.mean + z @ self.factor.T
        return np.clip(x, -1.0, 1.0).astype(np.float32).reshape(n, *self.image_shape)


def fit_gaussian(images: np.ndarray) -> GaussianBaseline:
    """Fit mean and full covariance of (N, C, H, W) images flattened per sample.

    The factor comes from `eigh` with negative eigenvalues clipped to zero, so a rank-deficient
    covariance (constant border pixels, N < D) still samples safely.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be shaped (N, C, H, W), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 images to fit a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=0)
    cov = np.atleast_2d(np.cov(flat, rowvar=False))
    cov = (cov + cov.T) / 2.0
    eigvals, eigvecs = np.linalg.eigh(cov)
    factor = eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))
    c, h, w = (int(s) for s in x.shape[1:])
    return GaussianBaseline(mean=mean, cov=cov, factor=factor, image_shape=(c, h, w))
