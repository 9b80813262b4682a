"""Differentiable augmentation for small-data GAN training (DiffAugment, ADA).

On a few thousand images the discriminator memorizes the training set and its feedback to the
generator collapses. DiffAugment (Zhao et al. 2020) shows D only augmented images, real and fake
alike, and backpropagates through the augmentation into G; ADA (Karras et al. 2020) applies each
augmentation to an image with a probability ``p`` tuned during training from an overfitting
signal, so that augmentations do not leak into the generated distribution.

The ops follow DiffAugment's reference implementation on (N, C, H, W) images in [-1, 1]:

* ``color``: brightness (add U[-0.5, 0.5)), saturation (scale the distance to the per-pixel
  channel mean by U[0, 2)), contrast (scale the distance to the image mean by U[0.5, 1.5)).
  Applied to 3-channel batches only: saturation means nothing on one channel, and the config
  cannot know the channel count (it is known after prepare), so other batches pass unchanged.
  Like DiffAugment's, the result is not clipped and may leave [-1, 1] (clipping would cut the
  gradient to G on bright pixels); D sees the same transformation on reals and fakes.
* ``translation``: an integer shift of up to 1/8 of the side along each axis, zero padding.
* ``cutout``: a square of half the side set to zero. Unlike DiffAugment, whose square may hang
  over the border, the square lies wholly inside the image, so every cutout removes exactly a
  quarter of it (the digits' informative pixels are central, not at the border).

Every random number comes from an explicit :class:`torch.Generator` (or the global RNG when none
is given), drawn on the generator's device, so one seed gives one batch of augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from gan.transfer import to_device

# Canonical order of application (DiffAugment's): colour first so that translation's padding and
# the cutout stay exactly zero.
AUGMENTATIONS = ("color", "translation", "cutout")

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """``"translation,cutout"`` (or a sequence of names) -> the kinds in the order they apply.

    An empty string means no augmentation. Unknown names are refused with the allowed ones.
    """
    names = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    names = [str(n).strip() for n in names]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(AUGMENTATIONS)} (comma-separated, or empty for none)"
        )
    return tuple(k for k in AUGMENTATIONS if k in names)


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
    return p


def _rand(shape: tuple[int, ...], rng: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) of ``like``'s dtype on ``like``'s device, drawn on the generator's own device."""
    if rng is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    drawn = torch.rand(shape, generator=rng, device=rng.device, dtype=like.dtype)
    return to_device(drawn, like.device)


def _randint(
    low: int, high: int, n: int, rng: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """n integers in [low, high)."""
    if rng is None:
        return torch.randint(low, high, (n,), device=device)
    return to_device(torch.randint(low, high, (n,), generator=rng, device=rng.device), device)


def _per_image(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def color(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, saturation and contrast per image (3-channel images only)."""
    brightness = _rand(_per_image(x), rng, x) - 0.5
    saturation = _rand(_per_image(x), rng, x) * 2.0
    contrast = _rand(_per_image(x), rng, x) + 0.5
    x = x + brightness
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * saturation + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * contrast + image_mean


def _shift_limit(side: int) -> int:
    return int(side * TRANSLATION_RATIO + 0.5)


def translation(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by integers (dy, dx), |dy| <= H/8 and |dx| <= W/8 (rounded), filling
    with zeros: ``out[..., r, c] = x[..., r - dy, c - dx]``."""
    n, c, h, w = x.shape
    sh, sw = _shift_limit(h), _shift_limit(w)
    dy = _randint(-sh, sh + 1, n, rng, x.device)
    dx = _randint(-sw, sw + 1, n, rng, x.device)
    padded = F.pad(x, (sw, sw, sh, sh))
    rows = torch.arange(h, device=x.device)[None, :] + sh - dy[:, None]  # (N, H)
    cols = torch.arange(w, device=x.device)[None, :] + sw - dx[:, None]  # (N, W)
    # Advanced indexing is a gather, so the gradient reaches the pixels that were kept.
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def cutout_size(side: int) -> int:
    """The cutout square's side for an image side."""
    return int(side * CUTOUT_RATIO + 0.5)


def cutout(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Zero a square of half the side per image, placed uniformly wholly inside the image."""
    n, _, h, w = x.shape
    ch, cw = cutout_size(h), cutout_size(w)
    top = _randint(0, h - ch + 1, n, rng, x.device)
    left = _randint(0, w - cw + 1, n, rng, x.device)
    rows = torch.arange(h, device=x.device)[None, :] - top[:, None]  # (N, H)
    cols = torch.arange(w, device=x.device)[None, :] - left[:, None]
    inside = ((rows >= 0) & (rows < ch))[:, :, None] & ((cols >= 0) & (cols < cw))[:, None, :]
    return x * (~inside).to(x.dtype)[:, None]


_OPS = {"color": color, "translation": translation, "cutout": cutout}


def augment(
    x: torch.Tensor,
    kinds: str | Iterable[str],
    p: float = 1.0,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply each of ``kinds`` to each image of ``x`` (N, C, H, W) independently with
    probability ``p`` (ADA); ``p=1`` is plain DiffAugment. Differentiable with respect to ``x``.

    With ``p == 0`` or no kinds, ``x`` itself is returned and nothing is drawn from ``rng``, so
    an adaptive pipeline at p = 0 leaves the training's random stream as it would be without
    augmentation. Otherwise each op draws one U[0, 1) per image for its decision, then its own
    parameters for every image (decided or not), so the draws do not depend on ``p``; colour on
    a batch without 3 channels is skipped and draws nothing.
    """
    kinds = parse_kinds(kinds)
    p = _check_p(p)
    if x.dim() != 4:
        raise ValueError(f"augment expects images shaped (N, C, H, W), got {tuple(x.shape)}")
    if p == 0.0 or not kinds:
        return x
    for kind in kinds:
        if kind == "color" and x.shape[1] != 3:
            continue
        apply = _rand((x.shape[0],), rng, x) < p
        x = torch.where(apply[:, None, None, None], _OPS[kind](x, rng), x)
    return x


class Augment:
    """The augmentation pipeline given to :func:`gan.step.train_step`: ``augment(x) -> x'``.

    ``p`` is a plain attribute: an adaptive controller (:class:`AdaptiveAugment`) sets it between
    steps. Pass the training's own ``rng`` (the one already in the checkpoint) as ``rng`` so that
    a resumed run draws the same augmentations; with data-parallel workers each worker's own
    generator gives each its own augmentations, as each has its own images.
    """

    def __init__(
        self,
        kinds: str | Iterable[str],
        p: float = 1.0,
        rng: torch.Generator | None = None,
    ) -> None:
        self.kinds = parse_kinds(kinds)
        self.p = p
        self.rng = rng

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_p(value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.kinds, self._p, self.rng)

    def __repr__(self) -> str:
        return f"Augment(kinds={','.join(self.kinds)!r}, p={self._p:.4f})"


class AdaptiveAugment:
    """ADA's controller of the augmentation probability ``p``.

    Feed it, after every training step, the mean of sign(D(real)) over the step's real images and
    their count (:attr:`gan.step.StepStats.real_sign`, ``batch``). Every ``interval`` steps it
    takes the overfitting signal r_t = E[sign(D(x_real))] over the images seen since the last
    adjustment and moves ``p`` by sign(r_t - target) * images / adjust_speed, clamped to [0, 1]
    (as ADA: up when D is too sure of the reals, down when not, unchanged at equality).
    ``adjust_speed`` is the number of images over which p could go from 0 to 1.

    With data-parallel workers, pass the all-reduced mean and the global batch so that every
    worker computes the same ``p``. :meth:`state_dict` is a small dict of Python numbers that
    ``torch.load(weights_only=True)`` accepts.
    """

    def __init__(
        self,
        *,
        target: float = 0.6,
        adjust_speed: int = 20_000,
        interval: int = 4,
        p: float = 0.0,
    ) -> None:
        if not -1.0 < target < 1.0:
            raise ValueError(f"target is a mean of signs, so it must be in (-1, 1), got {target}")
        if adjust_speed < 1 or interval < 1:
            raise ValueError(
                f"adjust_speed and interval must be >= 1, got {adjust_speed} and {interval}"
            )
        self.target = float(target)
        self.adjust_speed = int(adjust_speed)
        self.interval = int(interval)
        self.p = _check_p(p)
        self.signal: float | None = None  # r_t of the last adjustment, for logging
        self._sign_sum = 0.0
        self._images = 0
        self._steps = 0

    def update(self, real_sign: float | torch.Tensor, images: int) -> float:
        """Accumulate one step's mean sign of D(real) over ``images`` images; return ``p``."""
        value = float(real_sign)
        if not -1.0 <= value <= 1.0 or math.isnan(value):
            raise ValueError(f"real_sign is a mean of signs in [-1, 1], got {value}")
        if images < 1:
            raise ValueError(f"images must be >= 1, got {images}")
        self._sign_sum += value * images
        self._images += images
        self._steps += 1
        if self._steps >= self.interval:
            self.signal = self._sign_sum / self._images
            direction = math.copysign(1.0, self.signal - self.target)
            if self.signal == self.target:
                direction = 0.0
            self.p = min(max(self.p + direction * self._images / self.adjust_speed, 0.0), 1.0)
            self._sign_sum, self._images, self._steps = 0.0, 0, 0
        return self.p

    _KEYS = ("p", "signal", "sign_sum", "images", "steps")

    def state_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "signal": self.signal,
            "sign_sum": self._sign_sum,
            "images": self._images,
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._KEYS if k not in state]
        if missing:
            raise ValueError(
                f"not an AdaptiveAugment state: missing {', '.join(missing)} "
                f"(expected keys {', '.join(self._KEYS)})"
            )
        self.p = _check_p(state["p"])
        self.signal = None if state["signal"] is None else float(state["signal"])
        self._sign_sum = float(state["sign_sum"])
        self._images = int(state["images"])
        self._steps = int(state["steps"])

    def __repr__(self) -> str:
        return (
            f"AdaptiveAugment(p={self.p:.4f}, target={self.target}, "
            f"adjust_speed={self.adjust_speed}, interval={self.interval})"
        )


__all__ = [
    "AUGMENTATIONS",
    "AdaptiveAugment",
    "Augment",
    "augment",
    "color",
    "cutout",
    "cutout_size",
    "parse_kinds",
    "translation",
]
