"""The Parquet shard layout: one row per image, pixels as a fixed-size uint8 list."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gan.data.arrays import ImageSet


def to_table(data: ImageSet) -> pa.Table:
    """An Arrow table with columns ``image`` (fixed-size list<uint8>) and ``label`` (int64)."""
    flat = data.images.reshape(len(data), -1)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.uint8()), flat.shape[1])
    return pa.table({"image": pixels, "label": pa.array(data.labels, pa.int64())})


def from_table(table: pa.Table, shape: tuple[int, int, int]) -> ImageSet:
    """Inverse of ``to_table`` for images of ``shape`` (C, H, W)."""
    size = int(np.prod(shape))
    column = table.column("image").combine_chunks()
    if column.type.list_size != size:
        raise ValueError(f"shard rows hold {column.type.list_size} pixels, expected {size}")
    pixels = column.values.to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
    images = pixels.reshape(len(table), *shape)
    labels = table.column("label").to_numpy().astype(np.int64)
    return ImageSet(images, labels)


def read_shard(
    path: str | Path, shape: tuple[int, int, int], filesystem: pafs.FileSystem | None = None
) -> ImageSet:
    """One Parquet shard file of images shaped ``shape`` (C, H, W); ``path`` is on
    ``filesystem`` when one is given (``bucket/key`` on an S3 file system)."""
    return from_table(pq.read_table(str(path), filesystem=filesystem), shape)


def concat(parts: Sequence[ImageSet]) -> ImageSet:
    """The parts one after another, as one set."""
    return ImageSet(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )


def content_digest(data: ImageSet) -> str:
    """sha256 over shapes, pixels and labels: equal data gives an equal digest."""
    h = hashlib.sha256()
    h.update(repr((data.images.shape, str(data.images.dtype))).encode())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


def split_shards(data: ImageSet, num_shards: int) -> list[ImageSet]:
    """Contiguous, nearly equal parts (the caller shuffles first)."""
    bounds = np.linspace(0, len(data), num_shards + 1).round().astype(int)
    return [
        ImageSet(data.images[a:b], data.labels[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
