"""One GAN training iteration: a discriminator update, then a generator update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gan.losses import nonsaturating_d_loss, nonsaturating_g_loss


@dataclass
class StepStats:
    """Detached per-iteration figures; the caller decides when to synchronize them to floats."""

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_real: torch.Tensor
    d_fake: torch.Tensor


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(
    *,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    latent_dim: int,
    rng: torch.Generator | None = None,
    generator_inner: nn.Module | None = None,
    discriminator_inner: nn.Module | None = None,
) -> StepStats:
    """Update D on ``real`` and a fresh fake batch, then G against the updated D.

    ``generator`` and ``discriminator`` may be DistributedDataParallel wrappers; pass the wrapped
    modules as ``*_inner``. Fakes for the D phase come from the inner G under no_grad (no G
    gradients to synchronize), and the G phase calls the inner D with its parameters frozen, so
    DDP never waits for D gradients that a G update does not produce.
    """
    g_inner = generator_inner if generator_inner is not None else generator
    d_inner = discriminator_inner if discriminator_inner is not None else discriminator
    batch = real.shape[0]

    z = torch.randn(batch, latent_dim, generator=rng, device=real.device)
    with torch.no_grad():
        fake = g_inner(z)
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    loss_d = nonsaturating_d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    set_requires_grad(d_inner, False)
    try:
        z = torch.randn(batch, latent_dim, generator=rng, device=real.device)
        loss_g = nonsaturating_g_loss(d_inner(generator(z)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    finally:
        set_requires_grad(d_inner, True)

    return StepStats(
        loss_d=loss_d.detach(),
        loss_g=loss_g.detach(),
        d_real=torch.sigmoid(real_logits.detach()).mean(),
        d_fake=torch.sigmoid(fake_logits.detach()).mean(),
    )
