"""Dataset readers into one array layout: uint8 images (N, C, H, W) and int64 labels (N,)."""

from gan.data.arrays import ImageSet, to_model_range
from gan.data.common import ON_BAD, BadImagesError
from gan.data.sources import FORMATS, SOURCES, detect_format, load_source, read_source

__all__ = [
    "FORMATS",
    "ON_BAD",
    "SOURCES",
    "BadImagesError",
    "ImageSet",
    "detect_format",
    "load_source",
    "read_source",
    "to_model_range",
]
