"""A stronger trivial baseline: a mixture of Gaussians over the training pixels.

One Gaussian (``gaussian_baseline.py``) blurs every class into one blob; ten full-covariance
components can give each digit class its own mean and covariance. A GAN trained on a small data
set should beat this too: a GAN whose Fréchet distance sits near the mixture's has learnt little
more than per-mode pixel statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianMixtureBaseline:
    """Weights, means and covariance factors (float64) of a mixture over flattened images."""

    weights: np.ndarray  # (K,), sums to 1
    means: np.ndarray  # (K, D)
    factors: np.ndarray  # (K, D, D), factors[k] @ factors[k].T == covariance of component k
    image_shape: tuple[int, int, int]  # (C, H, W)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Draw n images (n, C, H, W), float32, clipped to [-1, 1]; deterministic per seed.

        Each image picks its component by the mixture weights, in draw order (not grouped by
        component).
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n!r}")
        rng = np.random.default_rng(seed)
        components = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.means.shape[1]))
        x = self.means[components] + np.einsum("nij,nj->ni", self.factors[components], z)
        return np.clip(x, -1.0, 1.0).astype(np.float32).reshape(n, *self.image_shape)


def fit_gaussian_mixture(
    images: np.ndarray,
    components: int = 10,
    *,
    seed: int = 0,
    reg_covar: float = 1e-4,
    max_iter: int = 100,
    max_images: int | None = None,
) -> GaussianMixtureBaseline:
    """Fit scikit-learn's ``GaussianMixture`` (full covariances, k-means initialization) to
    (N, C, H, W) images flattened per sample; deterministic for a given ``seed``.

    ``reg_covar`` is added to every covariance's diagonal: a component holds about N/K images,
    fewer than the D pixels, and constant border pixels have no variance at all, so without it the
    covariances are singular. 1e-4 (a standard deviation of 0.01 on the [-1, 1] scale) keeps them
    invertible while barely blurring the samples.

    An EM iteration costs about K * N * D^2 operations, so ``max_images`` (a random subset drawn
    with ``seed``) bounds the cost on large data sets: 10 components on 1,400 digits of 16×16
    take seconds, on 60,000 MNIST images of 32×32 minutes.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be shaped (N, C, H, W), got shape {x.shape}")
    if not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive integer, got {components!r}")
    if x.shape[0] < 2 * components:
        raise ValueError(
            f"need at least 2 images per component: {x.shape[0]} images for {components} "
            "components; pass fewer components"
        )
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if reg_covar <= 0:
        raise ValueError(f"reg_covar must be > 0, got {reg_covar}")
    if max_images is not None:
        if max_images < 2 * components:
            raise ValueError(
                f"max_images ({max_images}) must be at least 2 per component ({components})"
            )
        if x.shape[0] > max_images:
            keep = np.random.default_rng(seed).choice(x.shape[0], size=max_images, replace=False)
            x = x[np.sort(keep)]
    # Imported here: scikit-learn's mixture module takes seconds to import, and only this
    # baseline (in the evaluate step) needs it.
    from sklearn.mixture import GaussianMixture

    flat = x.reshape(x.shape[0], -1)
    mixture = GaussianMixture(
        n_components=components,
        covariance_type="full",
        reg_covar=reg_covar,
        max_iter=max_iter,
        random_state=seed,
    ).fit(flat)
    # Cholesky factors of the fitted covariances (positive definite thanks to reg_covar).
    factors = np.linalg.cholesky(mixture.covariances_)
    weights = mixture.weights_ / mixture.weights_.sum()
    c, h, w = (int(s) for s in x.shape[1:])
    return GaussianMixtureBaseline(
        weights=weights, means=mixture.means_, factors=factors, image_shape=(c, h, w)
    )
