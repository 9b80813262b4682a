"""DCGAN generator and discriminator for square images of 8 to 256 pixels.

Both networks are plain modules: no distributed or tracking code. The resolution decides the
depth: a 4×4 base is doubled until it reaches the resolution, so it must be a power of two.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gan.nn.normalization import (
    GENERATOR_NORMALIZATIONS,
    NORMALIZATIONS,
    apply_spectral_norm,
    make_norm,
)

MIN_RESOLUTION = 8
MAX_RESOLUTION = 256


def check_resolution(resolution: int) -> None:
    """Raise ValueError unless the DCGAN stack can build this resolution."""
    if (
        not isinstance(resolution, int)
        or resolution < MIN_RESOLUTION
        or resolution > MAX_RESOLUTION
        or resolution & (resolution - 1)
    ):
        allowed = ", ".join(str(2**k) for k in range(3, int(math.log2(MAX_RESOLUTION)) + 1))
        raise ValueError(
            f"resolution {resolution!r} cannot be built: the DCGAN stack doubles a 4x4 base, "
            f"so it must be one of {allowed}"
        )


def _check_norm(norm: str) -> None:
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {norm!r}; allowed: {', '.join(NORMALIZATIONS)}")


def _check_generator_norm(norm: str) -> None:
    _check_norm(norm)
    if norm not in GENERATOR_NORMALIZATIONS:
        raise ValueError(
            f"spectral norm is for the discriminator; the generator's normalization must be one "
            f"of {', '.join(GENERATOR_NORMALIZATIONS)}, got {norm!r}"
        )


def _conv_bias(norm: str) -> bool:
    """A convolution followed by a batch-norm layer needs no bias: the norm's shift replaces it."""
    return norm in ("none", "spectral")


def _num_upsamplings(resolution: int) -> int:
    check_resolution(resolution)
    return int(math.log2(resolution)) - 2


def _check_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("this network is unconditional (num_classes=0); pass no labels")
        return
    if labels is None or labels.shape != (batch,):
        got = "none" if labels is None else f"shape {tuple(labels.shape)}"
        raise ValueError(
            f"a class-conditional network needs one label per image ({batch}), got {got}"
        )


class Generator(nn.Module):
    """z (N, latent_dim) [, labels (N,)] -> images (N, channels, R, R) in [-1, 1].

    With ``num_classes > 0`` the generator is class-conditional: a learned embedding of the
    label (``latent_dim`` wide) is concatenated to z.

    Width halves at each doubling, starting from ``width * 2**(blocks-1)`` at 4×4, as in DCGAN.
    No normalization on the output layer (DCGAN rule) unless ``g_output_norm``: then the last
    transposed convolution (without bias) is followed by a norm layer before the tanh.
    ``norm="spectral"`` is refused with ValueError: it is meant for the discriminator.
    """

    def __init__(
        self,
        *,
        latent_dim: int = 64,
        resolution: int = 16,
        channels: int = 1,
        width: int = 64,
        norm: str = "batch",
        g_output_norm: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        _check_generator_norm(norm)
        blocks = _num_upsamplings(resolution)
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        widths = [width * 2 ** (blocks - 1 - i) for i in range(blocks)]
        inputs = latent_dim * (2 if num_classes else 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(inputs, widths[0], 4, 1, 0, bias=_conv_bias(norm)),
            make_norm(norm, widths[0]),
            nn.ReLU(inplace=True),
        ]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=_conv_bias(norm)),
                make_norm(norm, w_out),
                nn.ReLU(inplace=True),
            ]
        if g_output_norm:
            layers += [
                nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=_conv_bias(norm)),
                make_norm(norm, channels),
            ]
        else:
            layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)]
        layers += [nn.Tanh()]
        self.net = nn.Sequential(*layers)
        if num_classes:
            self.embed = nn.Embedding(num_classes, latent_dim)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(labels, self.num_classes, z.shape[0])
        if labels is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z.view(z.shape[0], z.shape[1], 1, 1))


class Discriminator(nn.Module):
    """images (N, channels, R, R) [, labels (N,)] -> logits (N,).

    With ``num_classes > 0`` it is a projection discriminator (Miyato & Koyama, 2018): the logit
    gains the inner product of a learned label embedding with the last hidden features, summed
    over positions.

    No normalization on the input layer (DCGAN rule) unless ``d_input_norm``: then the first
    convolution (without bias) is followed by a norm layer. The logit is left raw so that the
    loss decides the link function. ``norm="spectral"``: no norm layers, and spectral norm on
    every convolution, the input and output ones included.
    """

    def __init__(
        self,
        *,
        resolution: int = 16,
        channels: int = 1,
        width: int = 64,
        norm: str = "batch",
        d_input_norm: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        _check_norm(norm)  # at resolution 8 there is no normalized layer to check it
        self.num_classes = num_classes
        blocks = _num_upsamplings(resolution)
        widths = [width * 2**i for i in range(blocks)]
        if d_input_norm:
            layers: list[nn.Module] = [
                nn.Conv2d(channels, widths[0], 4, 2, 1, bias=_conv_bias(norm)),
                make_norm(norm, widths[0]),
            ]
        else:
            layers = [nn.Conv2d(channels, widths[0], 4, 2, 1)]
        layers += [nn.LeakyReLU(0.2, inplace=True)]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(w_in, w_out, 4, 2, 1, bias=_conv_bias(norm)),
                make_norm(norm, w_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)
        if num_classes:
            self.embed = nn.Embedding(num_classes, widths[-1])
        init_dcgan_weights(self)
        if norm == "spectral":
            apply_spectral_norm(self)
            if num_classes:
                spectral_norm(self.embed)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(labels, self.num_classes, images.shape[0])
        if labels is None:
            return self.net(images).view(-1)
        features = self.net[:-1](images)
        projection = (self.embed(labels) * features.sum(dim=(2, 3))).sum(dim=1)
        return self.net[-1](features).view(-1) + projection


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) convolutions and N(1, 0.02) norm scales, from the DCGAN paper."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


__all__ = [
    "GENERATOR_NORMALIZATIONS",
    "NORMALIZATIONS",
    "Discriminator",
    "Generator",
    "check_resolution",
    "init_dcgan_weights",
]
