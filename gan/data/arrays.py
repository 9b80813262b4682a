"""The one in-memory layout every reader produces, and its checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, C, H, W) with pixel values 0..255 and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1], the range of the generator's tanh output."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


def from_model_range(images: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 0..255 (clipped)."""
    return ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of uint8 (N, C, H, W) images to (resolution, resolution)."""
    if images.shape[2] == resolution and images.shape[3] == resolution:
        return images
    x = torch.from_numpy(images).float()
    y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()
