"""The in-training evaluation distance: fixed latents, eval-mode sampling, inf on divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan.monitor import DistanceProbe
from gan.nn.models import Generator


class PixelFeatures:
    """Features = the first pixels: a known, exactly computable feature map."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4]


class Replay(nn.Module):
    """A 'generator' that returns stored images in order, whatever the latents."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images)
        self.anchor = nn.Parameter(torch.zeros(()))  # generate() reads the device from here

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[: z.shape[0]] + self.anchor


def test_a_generator_that_reproduces_the_reference_scores_zero():
    reference = torch.rand(64, 1, 4, 4) * 2 - 1
    probe = DistanceProbe(PixelFeatures(), reference, seeds=list(range(64)), latent_dim=8)
    assert probe.distance(probe.samples(Replay(reference))) == pytest.approx(0.0, abs=1e-9)
    shifted = probe.distance(probe.samples(Replay(reference + 0.5)))
    assert shifted == pytest.approx(4 * 0.25, rel=1e-6)  # ||mean shift||^2 over 4 features


def test_same_generator_same_distance_and_the_mode_is_restored():
    torch.manual_seed(0)
    generator = Generator(latent_dim=8, resolution=8, channels=1, width=8, norm="batch")
    generator.train()
    reference = torch.rand(32, 1, 8, 8) * 2 - 1
    probe = DistanceProbe(PixelFeatures(), reference, seeds=list(range(100, 132)), latent_dim=8)
    first = probe.distance(probe.samples(generator))
    assert generator.training  # sampled in eval mode, then put back
    assert probe.distance(probe.samples(generator)) == first
    generator.eval()
    assert probe.distance(probe.samples(generator)) == first


def test_non_finite_samples_rank_last():
    reference = torch.rand(8, 1, 4, 4)
    probe = DistanceProbe(PixelFeatures(), reference, seeds=list(range(8)), latent_dim=4)
    broken = reference.clone()
    broken[3, 0, 0, 0] = float("nan")
    assert math.isinf(probe.distance(broken))


def test_one_sample_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        DistanceProbe(PixelFeatures(), torch.rand(8, 1, 4, 4), seeds=[1], latent_dim=4)
