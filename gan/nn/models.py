"""DCGAN generator and discriminator for square images of 8 to 256 pixels.

Both networks are plain modules: no distributed or tracking code. The resolution decides the
depth: a 4×4 base is doubled until it reaches the resolution, so it must be a power of two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, channels, R, R) in [-1, 1].

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
    ) -> None:
        super().__init__()
        _check_generator_norm(norm)
        blocks = _num_upsamplings(resolution)
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.channels = channels
        widths = [width * 2 ** (blocks - 1 - i) for i in range(blocks)]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=_conv_bias(norm)),
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
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """images (N, channels, R, R) -> logits (N,).

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
    ) -> None:
        super().__init__()
        _check_norm(norm)  # at resolution 8 there is no normalized layer to check it
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
        init_dcgan_weights(self)
        if norm == "spectral":
            apply_spectral_norm(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).view(-1)


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


__all__ = [
    "GENERATOR_NORMALIZATIONS",
    "NORMALIZATIONS",
    "Discriminator",
    "Generator",
    "check_resolution",
    "init_dcgan_weights",
]
