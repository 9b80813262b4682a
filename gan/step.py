"""One GAN training iteration: discriminator update(s), then a generator update."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from gan.ema import GeneratorEMA
from gan.losses import get_loss, gradient_penalty, r1_from_logits
from gan.nn.normalization import frozen_bn_stats, recompute_bn_statistics


def _zero() -> torch.Tensor:
    return torch.zeros(())


@dataclass
class StepStats:
    """Detached per-iteration figures; the caller decides when to synchronize them to floats.

    ``loss_d`` is the adversarial D loss without penalties; ``r1`` and ``gp`` are the unweighted
    penalties (zero when unused). With ``d_steps > 1``, ``loss_d``, ``d_real``, ``d_fake`` and
    ``gp`` are means over the D updates and ``r1`` the mean over those that applied it.
    ``d_real``/``d_fake`` are the mean sigmoid of the logits, whatever the loss.
    """

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_real: torch.Tensor
    d_fake: torch.Tensor
    r1: torch.Tensor = field(default_factory=_zero)
    gp: torch.Tensor = field(default_factory=_zero)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _noise(
    batch: int, latent_dim: int, rng: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard normal latents on ``device``, drawn from ``rng`` on the rng's own device (a CPU
    generator cannot draw CUDA tensors directly)."""
    if rng is None:
        return torch.randn(batch, latent_dim, device=device)
    return torch.randn(batch, latent_dim, generator=rng, device=rng.device).to(device)


def _mean(values: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    if not values:
        return empty
    if len(values) == 1:
        return values[0]
    return torch.stack(values).mean()


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
    loss: str = "nonsaturating",
    r1_gamma: float = 0.0,
    r1_interval: int = 1,
    step: int = 0,
    gp_weight: float = 0.0,
    d_steps: int = 1,
    freeze_g_stats_in_d_phase: bool = False,
    ema: GeneratorEMA | None = None,
) -> StepStats:
    """Update D ``d_steps`` times on ``real`` and fresh fake batches, then G against the updated D.

    ``generator`` and ``discriminator`` may be DistributedDataParallel wrappers; pass the wrapped
    modules as ``*_inner``. Fakes for the D phase come from the inner G under no_grad (no G
    gradients to synchronize), and the G phase calls the inner D with its parameters frozen, so
    DDP never waits for D gradients that a G update does not produce.

    Options (the defaults reproduce the plain non-saturating DCGAN step exactly):

    * ``loss``: one of :data:`gan.losses.LOSSES`.
    * ``r1_gamma``/``r1_interval``: R1 penalty on the reals with weight ``r1_gamma *
      r1_interval`` on every ``r1_interval``-th D update (lazy regularization, StyleGAN2); the
      D update index is ``step * d_steps + i``. The gradient is taken through the same D forward
      on the reals that the loss uses.
    * ``gp_weight``: WGAN-GP penalty weight (one more D forward, on interpolates, per D update).
    * ``d_steps``: D updates per G update, each on the same ``real`` batch with fresh noise.
    * ``freeze_g_stats_in_d_phase``: G's batch-norm layers normalize the D phase's fakes with
      batch statistics (training mode) but do not update their running statistics.
    * ``ema``: updated with the inner G and ``step`` after the G update.
    """
    d_loss_fn, g_loss_fn = get_loss(loss)
    if r1_gamma < 0 or gp_weight < 0:
        raise ValueError(f"r1_gamma and gp_weight must be >= 0, got {r1_gamma} and {gp_weight}")
    if r1_interval < 1 or d_steps < 1:
        raise ValueError(f"r1_interval and d_steps must be >= 1, got {r1_interval} and {d_steps}")
    g_inner = generator_inner if generator_inner is not None else generator
    d_inner = discriminator_inner if discriminator_inner is not None else discriminator
    batch = real.shape[0]

    losses_d, d_reals, d_fakes, r1s, gps = [], [], [], [], []
    for i in range(d_steps):
        z = _noise(batch, latent_dim, rng, real.device)
        frozen = frozen_bn_stats(g_inner) if freeze_g_stats_in_d_phase else nullcontext()
        with torch.no_grad(), frozen:
            fake = g_inner(z)
        apply_r1 = r1_gamma > 0 and (step * d_steps + i) % r1_interval == 0
        real_in = real.detach().requires_grad_(True) if apply_r1 else real
        real_logits = discriminator(real_in)
        fake_logits = discriminator(fake)
        loss_d = d_loss_fn(real_logits, fake_logits)
        total = loss_d
        if apply_r1:
            r1 = r1_from_logits(real_logits, real_in)
            total = total + (r1_gamma * r1_interval) * r1
            r1s.append(r1.detach())
        if gp_weight > 0:
            gp = gradient_penalty(discriminator, real, fake, rng)
            total = total + gp_weight * gp
            gps.append(gp.detach())
        opt_d.zero_grad(set_to_none=True)
        total.backward()
        opt_d.step()
        losses_d.append(loss_d.detach())
        d_reals.append(torch.sigmoid(real_logits.detach()).mean())
        d_fakes.append(torch.sigmoid(fake_logits.detach()).mean())

    set_requires_grad(d_inner, False)
    try:
        z = _noise(batch, latent_dim, rng, real.device)
        loss_g = g_loss_fn(d_inner(generator(z)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    finally:
        set_requires_grad(d_inner, True)

    if ema is not None:
        ema.update(g_inner, step)

    zero = torch.zeros((), device=real.device)
    return StepStats(
        loss_d=_mean(losses_d, zero),
        loss_g=loss_g.detach(),
        d_real=_mean(d_reals, zero),
        d_fake=_mean(d_fakes, zero),
        r1=_mean(r1s, zero),
        gp=_mean(gps, zero),
    )


__all__ = ["StepStats", "recompute_bn_statistics", "set_requires_grad", "train_step"]
