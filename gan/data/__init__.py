"""Dataset readers into one array layout: uint8 images (N, C, H, W) and int64 labels (N,)."""

from gan.data.arrays import ImageSet, to_model_range
from gan.data.sources import SOURCES, load_source

__all__ = ["SOURCES", "ImageSet", "load_source", "to_model_range"]
