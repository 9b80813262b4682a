"""Unit tests for gan.metrics: closed-form Fréchet cases, coverage, the Gaussian baseline and the
digit classifier on scikit-learn's digits (the "floor vs trivial baseline" sanity check)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gan.metrics import (
    DigitClassifier,
    class_coverage,
    classifier_accuracy,
    evaluate_samples,
    fit_gaussian,
    frechet_distance,
    frechet_distance_from_moments,
    mean_confidence,
    train_classifier,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- Fréchet distance


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def test_frechet_same_covariance_is_squared_mean_distance() -> None:
    rng = np.random.default_rng(0)
    d, n = 4, 50_000
    cov = _random_spd(rng, d)
    mu_a = np.array([0.0, 1.0, -1.0, 2.0])
    mu_b = np.array([1.0, 0.0, 0.5, 2.0])
    a = rng.multivariate_normal(mu_a, cov, size=n)
    b = rng.multivariate_normal(mu_b, cov, size=n)
    expected = float(np.sum((mu_a - mu_b) ** 2))  # 4.25
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02, abs=0.02)


def test_frechet_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(1)
    n = 50_000
    mu_a, mu_b = np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    a = mu_a + rng.standard_normal((n, 3)) * np.sqrt(var_a)
    b = mu_b + rng.standard_normal((n, 3)) * np.sqrt(var_b)
    # 1.25 from the means + (1-2)^2 + (2-1)^2 + 0 from the covariances = 3.25
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_from_moments_is_exact() -> None:
    rng = np.random.default_rng(2)
    d = 5
    s = _random_spd(rng, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    # Sb = 4 Sa commutes with Sa, so Tr(Sa + Sb - 2 sqrt(Sa Sb)) = Tr(Sa) (1 + 4 - 2*2).
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s)
    assert frechet_distance_from_moments(mu_a, s, mu_b, 4 * s) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_moments(mu_a, s, mu_a, s) == pytest.approx(0.0, abs=1e-9)


def test_frechet_identical_is_zero_and_symmetric() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 16))
    b = rng.standard_normal((400, 16)) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-6)


def test_frechet_handles_singular_covariance() -> None:
    """Dead ReLU units give all-zero feature columns; the distance must stay finite and right."""
    rng = np.random.default_rng(4)
    n = 20_000
    a = np.zeros((n, 4))
    b = np.zeros((n, 4))
    a[:, :2] = rng.standard_normal((n, 2))
    b[:, :2] = rng.standard_normal((n, 2)) + np.array([1.0, 0.0])
    value = frechet_distance(a, b)
    assert np.isfinite(value)
    assert value == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros(10), np.zeros((10, 1)), "2-D"),
        (np.zeros((4, 3, 2)), np.zeros((4, 6)), "2-D"),
        (np.zeros((10, 3)), np.zeros((10, 4)), "dimensions differ"),
        (np.zeros((1, 3)), np.zeros((10, 3)), "at least 2 rows"),
        (np.zeros((10, 3)), np.zeros((1, 3)), "at least 2 rows"),
        (np.full((10, 3), np.nan), np.zeros((10, 3)), "NaN"),
    ],
)
def test_frechet_rejects_bad_input(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


# --------------------------------------------------------------------------- coverage


def _one_hot_like(classes: list[int], num_classes: int, top: float) -> np.ndarray:
    p = np.full((len(classes), num_classes), (1.0 - top) / (num_classes - 1))
    p[np.arange(len(classes)), classes] = top
    return p


def test_class_coverage_counts_classes_above_fraction() -> None:
    # 100 predictions over 5 classes: 50, 30, 19, 1 and 0.
    classes = [0] * 50 + [1] * 30 + [2] * 19 + [3]
    p = _one_hot_like(classes, 5, top=0.6)
    assert class_coverage(p) == 4  # class 3 has exactly 1 % of predictions
    assert class_coverage(p, min_fraction=0.02) == 3
    assert class_coverage(p, min_fraction=0.3) == 2
    assert class_coverage(p, min_fraction=0.5) == 1
    assert class_coverage(_one_hot_like([2] * 10, 10, top=0.9)) == 1  # mode collapse


def test_mean_confidence_is_mean_of_max() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.5, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert mean_confidence(p) == pytest.approx((0.7 + 0.8 + 0.5 + 1 / 3) / 4)
    assert mean_confidence(np.eye(4)) == pytest.approx(1.0)


def test_coverage_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        class_coverage(np.array([[2.0, 1.0, 3.0]]))  # logits, not probabilities
    with pytest.raises(ValueError, match="sum to 1"):
        mean_confidence(np.array([[0.5, 0.6]]))
    with pytest.raises(ValueError):
        class_coverage(np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        mean_confidence(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="min_fraction"):
        class_coverage(np.eye(3), min_fraction=0.0)


# --------------------------------------------------------------------------- Gaussian baseline


def test_gaussian_baseline_reproduces_moments() -> None:
    rng = np.random.default_rng(5)
    d = 8
    true_cov = _random_spd(rng, d) * 0.01  # std ~0.1: clipping to [-1, 1] is negligible
    true_mean = rng.uniform(-0.3, 0.3, d)
    images = rng.multivariate_normal(true_mean, true_cov, size=20_000).reshape(-1, 2, 2, 2)
    model = fit_gaussian(images.astype(np.float32))
    np.testing.assert_allclose(model.mean, true_mean, atol=0.005)
    np.testing.assert_allclose(model.cov, true_cov, atol=0.001)

    samples = model.sample(50_000, seed=0)
    assert samples.shape == (50_000, 2, 2, 2)
    assert samples.dtype == np.float32
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=0), model.mean, atol=0.003)
    np.testing.assert_allclose(np.cov(flat, rowvar=False), model.cov, atol=0.0008)


def test_gaussian_baseline_range_determinism_and_rank_deficiency() -> None:
    rng = np.random.default_rng(6)
    images = rng.uniform(-1, 1, size=(5, 1, 4, 4)).astype(np.float32)  # N < D: singular cov
    images[:, :, 0, 0] = -1.0  # a constant pixel (zero variance)
    model = fit_gaussian(images)
    samples = model.sample(2_000, seed=1)
    assert samples.shape == (2_000, 1, 4, 4)
    assert np.isfinite(samples).all()
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    assert (np.abs(samples) == 1.0).any()  # the wide fit really was clipped
    np.testing.assert_allclose(samples[:, 0, 0, 0], -1.0, atol=1e-6)
    np.testing.assert_array_equal(model.sample(100, seed=7), model.sample(100, seed=7))
    assert not np.array_equal(model.sample(100, seed=7), model.sample(100, seed=8))
    with pytest.raises(ValueError):
        fit_gaussian(images[0])  # 3-D
    with pytest.raises(ValueError):
        fit_gaussian(images[:1])  # one image


# --------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return {"x_train": x_train, "x_test": x_test, "y_train": y_train, "y_test": y_test}


@pytest.fixture(scope="module")
def trained(digits: dict[str, np.ndarray]) -> tuple[DigitClassifier, float]:
    start = time.perf_counter()
    model = train_classifier(digits["x_train"], digits["y_train"], num_classes=10, seed=0)
    return model, time.perf_counter() - start


def test_classifier_accuracy_features_and_fd_floor(
    digits: dict[str, np.ndarray], trained: tuple[DigitClassifier, float]
) -> None:
    model, seconds = trained
    assert not model.training
    accuracy = classifier_accuracy(model, digits["x_test"], digits["y_test"])

    train_features = model.features(digits["x_train"])
    test_features = model.features(digits["x_test"])
    assert train_features.shape == (len(digits["x_train"]), 64)
    assert test_features.dtype == torch.float32

    baseline = fit_gaussian(digits["x_train"])
    gaussian_images = baseline.sample(len(digits["x_test"]), seed=0)
    gaussian_features = model.features(gaussian_images)

    fd_floor = frechet_distance(train_features.numpy(), test_features.numpy())
    fd_gaussian = frechet_distance(test_features.numpy(), gaussian_features.numpy())
    print(
        f"\n[metrics] classifier train {seconds:.2f}s, held-out accuracy {accuracy:.4f}, "
        f"FD train-vs-heldout {fd_floor:.4f}, FD heldout-vs-gaussian {fd_gaussian:.4f} "
        f"(ratio {fd_gaussian / fd_floor:.1f}x)"
    )
    assert accuracy > 0.95
    assert fd_floor * 3 < fd_gaussian


def test_evaluate_samples_and_mode_collapse(
    digits: dict[str, np.ndarray], trained: tuple[DigitClassifier, float]
) -> None:
    model, _ = trained
    real = evaluate_samples(model, digits["x_test"], digits["x_train"])
    assert set(real) == {"frechet_distance", "class_coverage", "mean_confidence"}
    assert real["class_coverage"] == 10
    assert real["mean_confidence"] > 0.9

    gaussian = fit_gaussian(digits["x_train"]).sample(len(digits["x_test"]), seed=0)
    fake = evaluate_samples(model, gaussian, digits["x_train"])
    assert fake["frechet_distance"] > 3 * real["frechet_distance"]

    zeros = digits["x_test"][digits["y_test"] == 0]
    collapsed = evaluate_samples(model, zeros, digits["x_train"])
    assert collapsed["class_coverage"] <= 2
    assert collapsed["frechet_distance"] > real["frechet_distance"]


def test_features_are_batched_and_use_eval_mode(
    digits: dict[str, np.ndarray], trained: tuple[DigitClassifier, float]
) -> None:
    model, _ = trained
    x = digits["x_train"][:700]  # more than one 512 chunk
    reference = model.features(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        again = model.features(torch.from_numpy(x))
        assert model.training  # mode restored
    finally:
        model.eval()
    torch.testing.assert_close(again, reference)
    for key, value in model.state_dict().items():  # batch-norm statistics not updated
        torch.testing.assert_close(value, state[key])
    probs = model.predict_proba(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(x)))
    with pytest.raises(ValueError):
        model.features(np.zeros((2, 3, 16, 16), dtype=np.float32))  # wrong channel count


def test_train_classifier_is_deterministic_and_leaves_global_rng(
    digits: dict[str, np.ndarray],
) -> None:
    x, y = digits["x_train"][:256], digits["y_train"][:256]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    a = train_classifier(x, y, num_classes=10, epochs=1, seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    assert torch.get_num_threads() == threads  # thread cap restored
    b = train_classifier(x, y, num_classes=10, epochs=1, seed=3)
    c = train_classifier(x, y, num_classes=10, epochs=1, seed=4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(("channels", "resolution"), [(1, 8), (3, 32), (1, 64)])
def test_classifier_geometries(channels: int, resolution: int) -> None:
    model = DigitClassifier(channels, resolution, num_classes=4, feature_dim=16)
    x = torch.zeros(3, channels, resolution, resolution)
    assert model(x).shape == (3, 4)
    assert model.features(x).shape == (3, 16)


def test_classifier_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DigitClassifier(1, 12, num_classes=10)
    with pytest.raises(ValueError, match="in_channels"):
        DigitClassifier(2, 16, num_classes=10)
    x = np.zeros((4, 1, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x, np.array([0, 1, 2, 10]), num_classes=10)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x, np.array([0, 1, 2]), num_classes=10)


def test_metrics_do_not_import_cluster_libraries() -> None:
    code = (
        "import sys, gan.metrics; "
        "bad = {'ray', 'mlflow', 'boto3'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
