"""gan.losses: the four GAN losses on fixed logits, and the R1 and WGAN-GP gradient penalties."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from gan.losses import (
    LOSSES,
    LeCamAnchors,
    consistency_penalty,
    get_loss,
    gradient_penalty,
    hinge_d_loss,
    hinge_g_loss,
    least_squares_d_loss,
    least_squares_g_loss,
    lecam_penalty,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_from_logits,
    r1_penalty,
    wasserstein_d_loss,
    wasserstein_g_loss,
)

REAL = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
FAKE = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)


def _sp(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------- losses


def test_loss_names_and_get_loss():
    assert LOSSES == ("nonsaturating", "hinge", "wasserstein", "least_squares")
    assert get_loss("nonsaturating") == (nonsaturating_d_loss, nonsaturating_g_loss)
    assert get_loss("hinge") == (hinge_d_loss, hinge_g_loss)
    assert get_loss("wasserstein") == (wasserstein_d_loss, wasserstein_g_loss)
    assert get_loss("least_squares") == (least_squares_d_loss, least_squares_g_loss)


@pytest.mark.parametrize("bad", ["wgan", "Hinge", "", None])
def test_get_loss_refuses_unknown_names_listing_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"unknown loss .*nonsaturating, hinge, wasserstein, le"):
        get_loss(bad)


# Hand-computed on REAL = [-1, 0, 2] and FAKE = [0.5, -2, 1] (mean FAKE = -1/6, mean REAL = 1/3).
EXPECTED = {
    # relu(1 - r) = [2, 1, 0] -> 1; relu(1 + f) = [1.5, 0, 2] -> 7/6; G: -mean f = 1/6
    "hinge": (1.0 + 7.0 / 6.0, 1.0 / 6.0),
    # mean f - mean r = -1/6 - 1/3; G: -mean f
    "wasserstein": (-0.5, 1.0 / 6.0),
    # 0.5 * (mean [4, 1, 1] + mean [0.25, 4, 1]) = 0.5 * (2 + 1.75); G: 0.5 * mean [0.25, 9, 0]
    "least_squares": (1.875, 0.5 * 9.25 / 3.0),
    "nonsaturating": (
        (_sp(1.0) + _sp(0.0) + _sp(-2.0)) / 3 + (_sp(0.5) + _sp(-2.0) + _sp(1.0)) / 3,
        (_sp(-0.5) + _sp(2.0) + _sp(-1.0)) / 3,
    ),
}


@pytest.mark.parametrize("name", LOSSES)
def test_losses_equal_hand_computed_values(name):
    d_loss, g_loss = get_loss(name)
    expected_d, expected_g = EXPECTED[name]
    assert d_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-12, abs=1e-15)
    assert g_loss(FAKE).item() == pytest.approx(expected_g, rel=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_each_term_is_a_mean_over_its_own_batch(name):
    d_loss, _ = get_loss(name)
    real = torch.tensor([2.0, -1.0, 0.5])
    fake = torch.tensor([0.3, -0.7])
    # Repeating a batch leaves its mean, hence the loss, unchanged.
    torch.testing.assert_close(d_loss(real, fake), d_loss(real.repeat(2), fake.repeat(3)))


def test_loss_gradients_on_the_logits():
    r = REAL.clone().requires_grad_(True)
    f = FAKE.clone().requires_grad_(True)
    hinge_d_loss(r, f).backward()
    # Only margin-violating logits get gradient: r < 1 -> -1/3, f > -1 -> +1/3.
    torch.testing.assert_close(r.grad, torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64) / 3)
    torch.testing.assert_close(f.grad, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / 3)
    f.grad = None
    least_squares_g_loss(f).backward()
    torch.testing.assert_close(f.grad, (FAKE - 1.0) / 3)
    f.grad = None
    wasserstein_g_loss(f).backward()
    torch.testing.assert_close(f.grad, torch.full((3,), -1.0 / 3, dtype=torch.float64))


# -------------------------------------------------------------------------------------- penalties


class _Linear(nn.Module):
    """D(x) = w . x + b over the flattened image: grad_x D = w for every sample."""

    def __init__(self, w: torch.Tensor, b: float = 0.3) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b


class _Tanh(nn.Module):
    """A nonlinear per-sample D: tanh(w . x) + 0.5 * (v . x)^2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return torch.tanh(flat @ self.w) + 0.5 * (flat @ self.v) ** 2


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 2, 3, generator=torch.Generator().manual_seed(seed)).double()


W = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.25], dtype=torch.float64)


def test_r1_on_a_linear_discriminator_is_half_the_squared_weight_norm():
    d = _Linear(W)
    r1 = r1_penalty(d, _images(4, 1))
    assert r1.item() == pytest.approx(0.5 * W.pow(2).sum().item(), rel=1e-12)
    # create_graph=True: the penalty is differentiable in D's parameters, d/dw 0.5||w||^2 = w.
    r1.backward()
    torch.testing.assert_close(d.w.grad, W)


def test_r1_matches_a_per_sample_autograd_reference():
    d = _Tanh(6)
    real = _images(5, 2)
    squared = []
    for x in real:
        x = x.unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
        squared.append(grad.pow(2).sum())
    expected = 0.5 * torch.stack(squared).mean()
    r1 = r1_penalty(d, real)
    torch.testing.assert_close(r1, expected)
    # Same gradient in D's parameters as the reference.
    grads = torch.autograd.grad(r1, [d.w, d.v])
    expected_grads = torch.autograd.grad(expected, [d.w, d.v])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    # r1_from_logits reuses a forward already made on reals that require grad.
    x = real.clone().requires_grad_(True)
    torch.testing.assert_close(r1_from_logits(d(x), x), expected)
    assert not real.requires_grad


def test_gradient_penalty_on_a_linear_discriminator():
    d = _Linear(W)
    norm = W.norm().item()
    gp = gradient_penalty(d, _images(4, 3), _images(4, 4), torch.Generator().manual_seed(5))
    assert gp.item() == pytest.approx((norm - 1.0) ** 2, rel=1e-12)
    gp.backward()
    torch.testing.assert_close(d.w.grad, 2 * (norm - 1.0) * W / norm)


def test_gradient_penalty_matches_an_explicit_interpolation_reference():
    d = _Tanh(6)
    real, fake = _images(5, 6), _images(5, 7)
    fake.requires_grad_(True)  # as if it came from G: no gradient must flow back to it
    gp = gradient_penalty(d, real, fake, torch.Generator().manual_seed(8))

    alpha = torch.rand(5, 1, 1, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    terms = []
    for i in range(5):
        x_hat = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i].detach()).unsqueeze(0)
        x_hat.requires_grad_(True)
        (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
        terms.append((grad.flatten().norm() - 1.0) ** 2)
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(gp, expected)
    grads = torch.autograd.grad(gp, [d.w, d.v])
    for a, b in zip(grads, torch.autograd.grad(expected, [d.w, d.v]), strict=True):
        torch.testing.assert_close(a, b)
    gp2 = gradient_penalty(d, real, fake, torch.Generator().manual_seed(8))
    assert torch.equal(gp.detach(), gp2.detach())  # alpha comes from the rng
    gp2.backward()
    assert fake.grad is None


def test_gradient_penalty_refuses_mismatched_batches():
    with pytest.raises(ValueError, match="one shape"):
        gradient_penalty(_Linear(W), _images(4, 0), _images(3, 1))


# ----------------------------------------------------------------------------------- regularizers


def test_lecam_penalty_equals_hand_computed_values():
    # relu(REAL - a_F) with a_F = -0.5: [0, 0.5, 2.5] -> mean of squares 6.5 / 3;
    # relu(a_R - FAKE) with a_R = 0.5: [0, 2.5, 0] -> 6.25 / 3. Sum 4.25.
    value = lecam_penalty(REAL, FAKE, anchor_real=0.5, anchor_fake=-0.5)
    assert value.item() == pytest.approx(4.25, rel=1e-12)
    anchors = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    assert lecam_penalty(REAL, FAKE, *anchors).item() == pytest.approx(4.25, rel=1e-12)
    r = REAL.clone().requires_grad_(True)
    f = FAKE.clone().requires_grad_(True)
    lecam_penalty(r, f, 0.5, -0.5).backward()
    # d/dr relu(r - a_F)^2 / 3 = 2 relu(r - a_F) / 3; d/df = -2 relu(a_R - f) / 3.
    torch.testing.assert_close(r.grad, torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64) / 3)
    torch.testing.assert_close(f.grad, torch.tensor([0.0, -5.0, 0.0], dtype=torch.float64) / 3)
    # D's outputs between the anchors are not penalized at all.
    assert lecam_penalty(REAL.clamp(max=-0.5), FAKE.clamp(min=0.5), 0.5, -0.5).item() == 0.0


def test_consistency_penalty_equals_hand_computed_values():
    # REAL - FAKE = [-1.5, 2, 1] -> mean of squares (2.25 + 4 + 1) / 3.
    assert consistency_penalty(REAL, FAKE).item() == pytest.approx(7.25 / 3, rel=1e-12)
    a = REAL.clone().requires_grad_(True)
    b = FAKE.clone().requires_grad_(True)
    consistency_penalty(a, b).backward()
    torch.testing.assert_close(a.grad, 2 * (REAL - FAKE) / 3)
    torch.testing.assert_close(b.grad, -2 * (REAL - FAKE) / 3)
    with pytest.raises(ValueError, match="one shape"):
        consistency_penalty(REAL, FAKE[:2])


def test_lecam_anchors_start_at_the_first_means_then_average():
    anchors = LeCamAnchors(decay=0.5)
    assert anchors.real is None and anchors.fake is None
    anchors.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0]))
    assert (anchors.real.item(), anchors.fake.item()) == (2.0, -1.0)
    anchors.update(torch.tensor([4.0]), torch.tensor([1.0]))
    assert (anchors.real.item(), anchors.fake.item()) == (3.0, 0.0)
    assert LeCamAnchors().decay == 0.99
    logits = torch.tensor([1.0], requires_grad=True)
    anchors.update(logits * 2, logits)
    assert not anchors.real.requires_grad  # anchors are constants for the penalty


def test_lecam_anchors_round_trip_through_a_weights_only_checkpoint():
    for updates in (0, 2):
        anchors = LeCamAnchors(decay=0.9)
        for i in range(updates):
            anchors.update(torch.tensor([float(i)]), torch.tensor([-float(i)]))
        buffer = io.BytesIO()
        torch.save({"lecam": anchors.state_dict()}, buffer)
        buffer.seek(0)
        restored = LeCamAnchors()
        restored.load_state_dict(torch.load(buffer, weights_only=True)["lecam"])
        assert restored.decay == 0.9
        for a, b in ((anchors.real, restored.real), (anchors.fake, restored.fake)):
            assert (a is None and b is None) or torch.equal(a, b)
        anchors.update(torch.tensor([5.0]), torch.tensor([1.0]))
        restored.update(torch.tensor([5.0]), torch.tensor([1.0]))
        assert torch.equal(anchors.real, restored.real)
    with pytest.raises(ValueError, match="missing fake"):
        LeCamAnchors().load_state_dict({"decay": 0.9, "real": None})
    with pytest.raises(ValueError, match="decay"):
        LeCamAnchors(decay=1.0)
