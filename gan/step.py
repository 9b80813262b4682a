"""One GAN training iteration: discriminator update(s), then a generator update."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from gan.ema import GeneratorEMA
from gan.losses import (
    LeCamAnchors,
    consistency_penalty,
    get_loss,
    gradient_penalty,
    lecam_penalty,
    r1_from_logits,
)
from gan.nn.normalization import frozen_bn_stats, recompute_bn_statistics
from gan.step_stats import StepStats
from gan.transfer import to_device


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
    return to_device(torch.randn(batch, latent_dim, generator=rng, device=rng.device), device)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _mean(values: list[torch.Tensor]) -> torch.Tensor | None:
    """The mean of ``values`` (None if there are none), with no operator for a single one."""
    if not values:
        return None
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
    reuse_fakes: bool = False,
    ema: GeneratorEMA | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lecam_weight: float = 0.0,
    lecam_anchors: LeCamAnchors | None = None,
    consistency_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    num_classes: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> StepStats:
    """Update D ``d_steps`` times on ``real`` and fresh fake batches, then G against the updated D.

    ``generator`` and ``discriminator`` may be DistributedDataParallel wrappers; pass the wrapped
    modules as ``*_inner``. Fakes for the D phase come from the inner G under no_grad (no G
    gradients to synchronize; with ``reuse_fakes`` the last D update's come from ``generator``),
    and the G phase calls the inner D with its parameters frozen, so DDP never waits for D
    gradients that a G update does not produce.

    Returns the iteration's :class:`gan.step_stats.StepStats`. Its gradient norms are those of
    the parameters in ``opt_d``'s and ``opt_g``'s groups: the gradients each optimizer stepped
    with (all of D's and G's parameters, as the pipeline builds them).

    Options (the defaults reproduce the plain non-saturating DCGAN step exactly):

    * ``loss``: one of :data:`gan.losses.LOSSES`.
    * ``r1_gamma``/``r1_interval``: R1 penalty on the reals with weight ``r1_gamma *
      r1_interval`` on every ``r1_interval``-th D update (lazy regularization, StyleGAN2); the
      D update index is ``step * d_steps + i``. The gradient is taken through the same D forward
      on the reals that the loss uses. R1 and ``gp_weight`` differentiate D twice: a D with
      gan.nn's synchronized batch norm across CPU ranks refuses that (pipelines/config.py refuses
      batch norm in D with either penalty).
    * ``gp_weight``: WGAN-GP penalty weight (one more D forward, on interpolates, per D update).
    * ``d_steps``: D updates per G update, each on the same ``real`` batch with fresh noise.
    * ``freeze_g_stats_in_d_phase``: G's batch-norm layers normalize the D phase's fakes with
      batch statistics (training mode) but do not update their running statistics.
    * ``reuse_fakes``: the G update trains on the fakes of the last D update (the PyTorch DCGAN
      example's step) instead of a batch from fresh noise: one G forward a step instead of two,
      and with synchronized batch norm in G two exchanges between ranks fewer per G norm layer.
      That forward runs through ``generator`` with gradients, and its graph is kept through the
      D update. Excludes ``freeze_g_stats_in_d_phase`` (there is no separate D-phase forward).
    * ``ema``: updated with the inner G and ``step`` after the G update.
    * ``augment``: a differentiable augmentation (e.g. :class:`gan.augment.Augment`) applied to
      every image D sees: the reals and fakes of the D phase and the fakes of the G phase, whose
      gradient reaches G through it (DiffAugment). R1 is taken with respect to the reals before
      augmentation, the WGAN-GP on interpolates of the augmented batches (what D sees).
    * ``lecam_weight``/``lecam_anchors``: LeCam regularization on the D update, against the
      moving anchors in ``lecam_anchors`` (updated here with each D update's logits first).
    * ``consistency_weight``: bCR on the reals, mean (D(x) - D(augment(x)))^2, with one more D
      forward on the reals as they are; needs ``augment``. The augmented side is the forward
      the loss uses, so with ADA's p < 1 only the images augmented at that step contribute.
    * ``labels``/``num_classes``: class-conditional training. ``labels`` are the reals' classes;
      every fake batch gets labels drawn uniformly from ``rng``; G and D are called with them
      (R1, the gradient penalty and consistency use the reals' labels).
    * ``autocast_dtype``: run G's and D's forward passes under ``torch.autocast`` with this
      dtype (e.g. ``torch.bfloat16``); their outputs are cast back to float32, so losses,
      penalties, augmentation and gradients of the parameters stay float32 (bf16 has float32's
      range: no loss scaling).
    """
    d_loss_fn, g_loss_fn = get_loss(loss)
    for name, value in (
        ("r1_gamma", r1_gamma),
        ("gp_weight", gp_weight),
        ("lecam_weight", lecam_weight),
        ("consistency_weight", consistency_weight),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if r1_interval < 1 or d_steps < 1:
        raise ValueError(f"r1_interval and d_steps must be >= 1, got {r1_interval} and {d_steps}")
    if reuse_fakes and freeze_g_stats_in_d_phase:
        raise ValueError(
            "reuse_fakes and freeze_g_stats_in_d_phase exclude each other: with reused fakes G "
            "makes one batch a step, for both updates, and its statistics count once"
        )
    if lecam_weight > 0 and lecam_anchors is None:
        raise ValueError(
            "lecam_weight > 0 needs lecam_anchors: pass one gan.losses.LeCamAnchors() kept "
            "across steps (and in the checkpoint)"
        )
    if consistency_weight > 0 and augment is None:
        raise ValueError(
            "consistency_weight > 0 needs augment: the penalty compares D on an image and on its "
            "augmentation"
        )
    if (labels is None) != (num_classes == 0):
        raise ValueError(
            "class-conditional training needs both labels and num_classes > 0; "
            f"got labels={'none' if labels is None else 'given'}, num_classes={num_classes}"
        )
    view = augment if augment is not None else _identity

    def fake_labels() -> torch.Tensor | None:
        if labels is None:
            return None
        if rng is None:
            return torch.randint(0, num_classes, (real.shape[0],), device=real.device)
        drawn = torch.randint(0, num_classes, (real.shape[0],), generator=rng, device=rng.device)
        return to_device(drawn, real.device)

    def forward(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """G's images or D's logits, in float32 whatever ``autocast_dtype``."""
        if autocast_dtype is None:
            return module(x) if y is None else module(x, y)
        with torch.autocast(real.device.type, dtype=autocast_dtype):
            out = module(x) if y is None else module(x, y)
        return out.float()

    g_inner = generator_inner if generator_inner is not None else generator
    d_inner = discriminator_inner if discriminator_inner is not None else discriminator
    batch = real.shape[0]

    losses_d, real_logits_seen, fake_logits_seen, r1s, gps = [], [], [], [], []
    lecams, consistencies, grad_norms_d = [], [], []
    for i in range(d_steps):
        z = _noise(batch, latent_dim, rng, real.device)
        y_fake = fake_labels()
        if reuse_fakes and i == d_steps - 1:
            # Through the wrapper and with gradients: the G phase back-propagates into it.
            fake_for_g, y_fake_for_g = forward(generator, z, y_fake), y_fake
            fake = fake_for_g.detach()
        else:
            frozen = frozen_bn_stats(g_inner) if freeze_g_stats_in_d_phase else nullcontext()
            with torch.no_grad(), frozen:
                fake = forward(g_inner, z, y_fake)
        apply_r1 = r1_gamma > 0 and (step * d_steps + i) % r1_interval == 0
        real_in = real.detach().requires_grad_(True) if apply_r1 else real
        real_seen, fake_seen = view(real_in), view(fake)
        real_logits = forward(discriminator, real_seen, labels)
        fake_logits = forward(discriminator, fake_seen, y_fake)
        loss_d = d_loss_fn(real_logits, fake_logits)
        total = loss_d
        if apply_r1:
            r1 = r1_from_logits(real_logits, real_in)
            total = total + (r1_gamma * r1_interval) * r1
            r1s.append(r1.detach())
        if gp_weight > 0:
            gp = gradient_penalty(
                lambda x: forward(discriminator, x, labels), real_seen.detach(), fake_seen, rng
            )
            total = total + gp_weight * gp
            gps.append(gp.detach())
        if lecam_weight > 0:
            assert lecam_anchors is not None
            lecam_anchors.update(real_logits, fake_logits)
            lecam = lecam_penalty(real_logits, fake_logits, lecam_anchors.real, lecam_anchors.fake)
            total = total + lecam_weight * lecam
            lecams.append(lecam.detach())
        if consistency_weight > 0:
            plain_logits = forward(discriminator, real.detach(), labels)
            consistency = consistency_penalty(plain_logits, real_logits)
            total = total + consistency_weight * consistency
            consistencies.append(consistency.detach())
        opt_d.zero_grad(set_to_none=True)
        total.backward()
        grad_norms_d.append(_grad_norms(opt_d))
        opt_d.step()
        # Kept as they are; the report window derives its figures from them (gan.step_stats).
        losses_d.append(loss_d.detach())
        real_logits_seen.append(real_logits.detach())
        fake_logits_seen.append(fake_logits.detach())

    # Only what was trainable is frozen, and thawed again; one walk of D's module tree a step.
    trainable_d = [p for p in d_inner.parameters() if p.requires_grad]
    for p in trainable_d:
        p.requires_grad_(False)
    try:
        if not reuse_fakes:
            z = _noise(batch, latent_dim, rng, real.device)
            y_fake_for_g = fake_labels()
            fake_for_g = forward(generator, z, y_fake_for_g)
        loss_g = g_loss_fn(forward(d_inner, view(fake_for_g), y_fake_for_g))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        grad_norms_g = _grad_norms(opt_g)
        opt_g.step()
    finally:
        for p in trainable_d:
            p.requires_grad_(True)

    if ema is not None:
        ema.update(g_inner, step)

    return StepStats(
        loss_d=_mean(losses_d),
        loss_g=loss_g.detach(),
        real_logits=_concatenated(real_logits_seen),
        fake_logits=_concatenated(fake_logits_seen),
        grad_norms_d=tuple(grad_norms_d),
        grad_norms_g=grad_norms_g,
        r1=_mean(r1s),
        gp=_mean(gps),
        lecam=_mean(lecams),
        consistency=_mean(consistencies),
    )


def _concatenated(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _grad_norms(optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, ...]:
    """The L2 norm of each gradient ``optimizer`` is about to step with (none without any).

    The parameters come from its groups, not from the module: walking a module's tree for them
    costs the host tens of µs a step (spectral norm's parametrizations deepen D's tree). One
    multi-tensor kernel (``torch._foreach_norm``, what ``torch.nn.utils.clip_grad_norm_`` uses),
    not one operator per parameter: a small model on a fast GPU is bound by the operators the
    host dispatches. The total norm is left to the report window (gan.step_stats).
    """
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return ()
    with torch.no_grad():
        return tuple(torch._foreach_norm(grads))


__all__ = ["StepStats", "recompute_bn_statistics", "set_requires_grad", "train_step"]
