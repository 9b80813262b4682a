"""Seeded sampling: the same seed gives the same image, whatever else is in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def latents_from_seeds(
    seeds: Sequence[int], latent_dim: int, counts: Sequence[int] | None = None
) -> torch.Tensor:
    """One latent per seed, or ``counts[i]`` latents drawn in order from ``seeds[i]``."""
    counts = [1] * len(seeds) if counts is None else list(counts)
    if len(counts) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(counts)} counts")
    parts = []
    for seed, count in zip(seeds, counts, strict=True):
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count} for seed {seed}")
        rng = torch.Generator().manual_seed(int(seed))
        # torch's CPU randn fills 16 values at a time but redoes the tail of a tensor whose size
        # is not a multiple of 16; drawing whole rows of 16 keeps latent i the same for any count.
        padded = -(-latent_dim // 16) * 16
        parts.append(torch.randn(int(count), padded, generator=rng)[:, :latent_dim])
    if not parts:
        return torch.zeros(0, latent_dim)
    return torch.cat(parts)


@torch.no_grad()
def generate(
    generator: nn.Module,
    latents: torch.Tensor,
    batch_size: int = 512,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] for ``latents`` (and, for a class-conditional generator, ``labels``),
    computed in chunks; the generator's mode is kept."""
    device = next(generator.parameters()).device

    def run(i: int, j: int) -> torch.Tensor:
        if labels is None:
            return generator(latents[i:j].to(device)).cpu()
        return generator(latents[i:j].to(device), labels[i:j].to(device)).cpu()

    if latents.shape[0] == 0:  # keep the image shape: (0, C, H, W)
        one = torch.zeros(1, latents.shape[1])
        if labels is None:
            return generator(one.to(device)).cpu()[:0]
        return generator(one.to(device), torch.zeros(1, dtype=torch.long, device=device)).cpu()[:0]
    return torch.cat([run(i, i + batch_size) for i in range(0, latents.shape[0], batch_size)])


def balanced_labels(count: int, num_classes: int) -> torch.Tensor | None:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... for ``count`` images; None when unconditional."""
    return torch.arange(count) % num_classes if num_classes else None


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (C, H', W') image laid out row by row, padded in white."""
    n, c, h, w = images.shape
    columns = columns or max(1, int(round(n**0.5)))
    rows = (n + columns - 1) // columns
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid
