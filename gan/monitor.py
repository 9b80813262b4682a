"""The quality of the generator measured while it trains.

Losses of a GAN say little about its samples; the evaluation distance does. During training, a
fixed batch of latents is drawn through the generator every few hundred steps and scored with the
Fréchet distance against held-out features computed once. Reduce-on-plateau schedules and
population-based training both rank by this number, and the sample grid of the same latents shows
the generator improving step by step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from gan.metrics.frechet import frechet_distance
from gan.sampling import balanced_labels, generate, latents_from_seeds


class FeatureExtractor(Protocol):
    def features(self, images: torch.Tensor) -> torch.Tensor: ...


class DistanceProbe:
    """Scores a generator on a fixed latent batch against fixed reference images.

    ``seeds`` fix the latents (one per seed, as :func:`gan.sampling.latents_from_seeds`), so two
    measurements differ only through the generator. The generator is sampled in eval mode (running
    batch-norm statistics) and its mode is restored afterwards. A class-conditional generator
    (``num_classes > 0``) draws every class in turn (:func:`gan.sampling.balanced_labels`).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference_images: torch.Tensor,
        seeds: list[int],
        latent_dim: int,
        num_classes: int = 0,
    ) -> None:
        if len(seeds) < 2:
            raise ValueError(f"the probe needs at least 2 samples, got {len(seeds)}")
        self.extractor = extractor
        self.reference = self._features(reference_images)
        self.latents = latents_from_seeds(seeds, latent_dim)
        self.labels = balanced_labels(len(seeds), num_classes)

    def _features(self, images: torch.Tensor) -> np.ndarray:
        return self.extractor.features(images).numpy().astype(np.float64)

    def samples(self, generator: nn.Module) -> torch.Tensor:
        """Images in [-1, 1] of the probe's latents, from ``generator`` in eval mode."""
        was_training = generator.training
        generator.eval()
        try:
            return generate(generator, self.latents, labels=self.labels)
        finally:
            generator.train(was_training)

    def distance(self, samples: torch.Tensor) -> float:
        """Fréchet distance of ``samples`` to the reference; ``inf`` for non-finite pixels
        (a diverged generator ranks last instead of crashing the measurement)."""
        if not torch.isfinite(samples).all():
            return float("inf")
        return frechet_distance(self._features(samples), self.reference)
