"""Sample grids as images: what the evaluate step saves and the train step logs per step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gan.data.arrays import from_model_range
from gan.sampling import image_grid


def grid_image(images: torch.Tensor) -> Image.Image:
    """(N, C, H, W) images in [-1, 1] laid out as one square-ish grid (grey or RGB)."""
    grid = from_model_range(image_grid(images))  # (C, H, W) uint8
    array = grid[0] if grid.shape[0] == 1 else np.transpose(grid, (1, 2, 0))
    return Image.fromarray(array)


def save_grid(images: torch.Tensor, path: Path) -> Path:
    """:func:`grid_image` of ``images`` written to ``path`` (PNG by its suffix)."""
    grid_image(images).save(path)
    return path
