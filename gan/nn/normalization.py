"""Normalization layers selectable by name from the config, and batch-norm statistics helpers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.parametrizations import spectral_norm

from gan.nn.sync_batchnorm import SyncBatchNorm

# "sync_batch" is batch norm whose statistics cover the global batch across all data-parallel
# workers; with one process it is exactly "batch". "spectral" means no normalization layer but
# spectral norm on every convolution weight: a Lipschitz constraint meant for the discriminator.
NORMALIZATIONS = ("batch", "sync_batch", "none", "spectral")
# The generator refuses "spectral" (see gan.nn.models.Generator).
GENERATOR_NORMALIZATIONS = ("batch", "sync_batch", "none")
DISCRIMINATOR_NORMALIZATIONS = NORMALIZATIONS


def make_norm(kind: str, num_features: int) -> nn.Module:
    """Return the normalization layer ``kind`` for ``num_features`` channels.

    "none" and "spectral" both give ``nn.Identity``: spectral norm is applied to the weights of
    the convolutions (:func:`apply_spectral_norm`), not as a layer.
    """
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "sync_batch":
        return SyncBatchNorm(num_features)
    if kind in ("none", "spectral"):
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; allowed: {', '.join(NORMALIZATIONS)}")


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Put spectral norm (``torch.nn.utils.parametrizations.spectral_norm``, one power iteration
    per training forward) on the weight of every Conv2d/ConvTranspose2d/Linear in ``module``.

    Call it after weight initialization: the parametrization keeps the initialized weight as
    ``parametrizations.weight.original`` and divides it by its largest singular value.
    """
    for m in list(module.modules()):
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            spectral_norm(m)
    return module


def batch_norm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every batch-norm layer (``BatchNorm*d``, ``SyncBatchNorm``, ours) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, batch-norm layers in training mode still normalize with the batch's
    statistics (synchronized across workers for sync batch norm) but update none of their
    buffers: running_mean, running_var and num_batches_tracked stay as they are.

    It switches ``track_running_stats`` off for the block, which every ``_BatchNorm.forward``
    (torch's BatchNorm and SyncBatchNorm, and :class:`~gan.nn.sync_batchnorm.SyncBatchNorm`)
    reads as "in training mode, pass no running buffers and count no batch". Layers in eval mode
    are unaffected: they still normalize with their running statistics.
    """
    layers = [(m, m.track_running_stats) for m in batch_norm_layers(module)]
    try:
        for m, _ in layers:
            if m.training:
                m.track_running_stats = False
        yield module
    finally:
        for m, flag in layers:
            m.track_running_stats = flag


@torch.no_grad()
def recompute_bn_statistics(
    generator: nn.Module, latents_batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]]
) -> int:
    """Standing statistics: replace the running statistics of every batch-norm layer in
    ``generator`` by the cumulative average over the given batches of latents.

    Resets each layer's running_mean/var and num_batches_tracked, runs ``generator`` in training
    mode with ``momentum=None`` (equal-weight average of the per-batch mean and unbiased variance)
    under no_grad, then restores every module's momentum and train/eval mode. Returns the number
    of batches. Raises ValueError (touching nothing) when there is none. A DDP wrapper is
    unwrapped; with sync batch norm every worker must pass the same number of batches. A batch
    may be a tuple of inputs (latents and, for a class-conditional generator, labels).
    """
    batches = list(latents_batches)
    if not batches:
        raise ValueError("recompute_bn_statistics needs at least one batch of latents")
    inner = generator.module if hasattr(generator, "module") else generator
    layers = batch_norm_layers(inner)
    momenta = [m.momentum for m in layers]
    modes = [(m, m.training) for m in inner.modules()]
    try:
        for m in layers:
            if not m.track_running_stats:
                continue
            m.reset_running_stats()
            m.momentum = None
        inner.train()
        for z in batches:
            inner(*z) if isinstance(z, tuple) else inner(z)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return len(batches)


__all__ = [
    "DISCRIMINATOR_NORMALIZATIONS",
    "GENERATOR_NORMALIZATIONS",
    "NORMALIZATIONS",
    "apply_spectral_norm",
    "batch_norm_layers",
    "frozen_bn_stats",
    "make_norm",
    "recompute_bn_statistics",
]
