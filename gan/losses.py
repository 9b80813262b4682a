"""GAN losses on raw discriminator logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nonsaturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), written with softplus for numerical stability."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the generator's non-saturating loss from Goodfellow et al. (2014)."""
    return F.softplus(-fake_logits).mean()
