"""gan.metrics.gaussian_mixture: the mixture baseline recovers a known two-cluster distribution,
samples deterministically per seed, stays in the pixel range and refuses unusable input."""

from __future__ import annotations

import numpy as np
import pytest

from gan.metrics import GaussianMixtureBaseline, fit_gaussian, fit_gaussian_mixture

# Two clusters of (1, 2, 2) "images" with different means, spreads and weights.
MEANS = np.array([[-0.5, -0.5, 0.5, 0.5], [0.4, 0.3, -0.4, -0.2]])
STDS = np.array([0.05, 0.1])
WEIGHTS = np.array([0.3, 0.7])


def _two_clusters(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.choice(2, size=n, p=WEIGHTS)
    x = MEANS[labels] + rng.standard_normal((n, 4)) * STDS[labels, None]
    return x.reshape(n, 1, 2, 2).astype(np.float32)


def _nearest_cluster(samples: np.ndarray) -> np.ndarray:
    flat = samples.reshape(len(samples), -1)
    return np.argmin(((flat[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _two_clusters(2000)


def test_two_components_recover_the_clusters(data):
    model = fit_gaussian_mixture(data, components=2, seed=0)
    assert isinstance(model, GaussianMixtureBaseline)
    order = np.argsort(model.means[:, 0])  # cluster 0 has the negative first pixel
    np.testing.assert_allclose(model.means[order], MEANS, atol=0.01)
    np.testing.assert_allclose(model.weights[order], WEIGHTS, atol=0.03)
    for k, std in zip(order, STDS, strict=True):
        cov = model.factors[k] @ model.factors[k].T
        np.testing.assert_allclose(np.sqrt(np.diag(cov)), std, rtol=0.1)


@pytest.mark.parametrize("components", [2, 10])
def test_samples_reproduce_the_cluster_means_and_weights(data, components):
    """With more components than clusters (the default 10) the samples still sit on the two
    clusters in the right proportions: extra components split a cluster, they do not blur it."""
    samples = fit_gaussian_mixture(data, components=components, seed=0).sample(6000, seed=1)
    assert samples.shape == (6000, 1, 2, 2) and samples.dtype == np.float32
    nearest = _nearest_cluster(samples)
    assert abs((nearest == 0).mean() - WEIGHTS[0]) < 0.03
    flat = samples.reshape(len(samples), -1)
    for k in range(2):
        np.testing.assert_allclose(flat[nearest == k].mean(0), MEANS[k], atol=0.01)
        np.testing.assert_allclose(flat[nearest == k].std(0), STDS[k], rtol=0.15)


def test_the_mixture_keeps_modes_apart_where_one_gaussian_blurs_them(data):
    def between(samples: np.ndarray) -> float:
        """Share of samples farther than 4 cluster standard deviations from both means."""
        flat = samples.reshape(len(samples), -1)
        dist = np.sqrt(((flat[:, None, :] - MEANS[None]) ** 2).sum(-1))
        return float((dist > 4 * 2 * STDS[None]).all(1).mean())

    mixture = fit_gaussian_mixture(data, components=2).sample(4000, seed=0)
    single = fit_gaussian(data).sample(4000, seed=0)
    assert between(mixture) < 0.01
    assert between(single) > 0.2  # 0.27 here: its samples fill the line between the modes


def test_fit_and_samples_are_deterministic_under_the_seeds(data):
    a = fit_gaussian_mixture(data, components=3, seed=5)
    b = fit_gaussian_mixture(data, components=3, seed=5)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.factors, b.factors)
    np.testing.assert_array_equal(a.sample(50, seed=7), b.sample(50, seed=7))
    assert not np.array_equal(a.sample(50, seed=7), a.sample(50, seed=8))
    assert a.sample(0, seed=0).shape == (0, 1, 2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        a.sample(-1, seed=0)


def test_samples_are_clipped_to_the_pixel_range():
    rng = np.random.default_rng(3)
    edge = np.clip(
        rng.choice([-0.98, 0.98], size=(400, 1, 1, 1)) + rng.normal(0, 0.1, (400, 3, 4, 4)), -1, 1
    )
    samples = fit_gaussian_mixture(edge, components=2).sample(2000, seed=0)
    assert samples.shape == (2000, 3, 4, 4)
    assert samples.min() == -1.0 and samples.max() == 1.0


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (np.zeros((40, 4, 4)), {}, r"\(N, C, H, W\)"),
        (np.zeros((15, 1, 2, 2)), {"components": 8}, "2 images per component"),
        (np.full((40, 1, 2, 2), np.nan), {"components": 2}, "NaN"),
        (np.zeros((40, 1, 2, 2)), {"components": 0}, "positive integer"),
        (np.zeros((40, 1, 2, 2)), {"components": 2, "reg_covar": 0.0}, "reg_covar"),
    ],
)
def test_unusable_input_is_refused(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_gaussian_mixture(images, **kwargs)


def test_max_images_fits_a_seeded_subset(data):
    subset = fit_gaussian_mixture(data, components=2, seed=0, max_images=500)
    again = fit_gaussian_mixture(data, components=2, seed=0, max_images=500)
    full = fit_gaussian_mixture(data, components=2, seed=0)
    np.testing.assert_array_equal(subset.means, again.means)
    assert not np.array_equal(subset.means, full.means)  # fewer images: another estimate
    order = np.argsort(subset.means[:, 0])
    np.testing.assert_allclose(subset.means[order], MEANS, atol=0.02)
    np.testing.assert_array_equal(  # a cap above N leaves the fit alone
        fit_gaussian_mixture(data, components=2, seed=0, max_images=10_000).means, full.means
    )
    with pytest.raises(ValueError, match="max_images"):
        fit_gaussian_mixture(data, components=4, max_images=6)
