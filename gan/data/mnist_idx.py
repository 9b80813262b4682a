"""MNIST in its original IDX files (also Fashion-MNIST, KMNIST: the same layout).

A folder holds ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (each optionally
gzipped, ``.gz``; ``train-images.idx3-ubyte`` spellings are accepted too) and, optionally, the
``t10k-`` pair, which is appended after the training images.

IDX layout: two zero bytes, a type byte (0x08: unsigned byte), a byte with the number of
dimensions, then each dimension as a big-endian uint32, then the data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from gan.data.arrays import ImageSet, resize
from gan.data.common import check_labels

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
SPLITS = ("train", "t10k")


def _candidates(split: str, kind: str) -> list[str]:
    ndim = 3 if kind == "images" else 1
    names = [f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"]
    return [n for name in names for n in (name, f"{name}.gz")]


def find_file(directory: Path, split: str, kind: str) -> Path | None:
    """The first existing of e.g. train-images-idx3-ubyte, ...ubyte.gz, train-images.idx3-ubyte."""
    for name in _candidates(split, kind):
        if (directory / name).is_file():
            return directory / name
    return None


def is_mnist_dir(path: Path) -> bool:
    """True for a folder holding any MNIST IDX image file."""
    return path.is_dir() and any(find_file(path, s, "images") for s in SPLITS)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """One IDX file as a uint8 array; the header must carry ``magic`` and the data be complete."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, no 4-byte header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}, unsigned bytes)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, header needs {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    found_bytes = len(raw) - header
    if found_bytes < expected:
        raise ValueError(
            f"{path}: truncated IDX file: dimensions {dims} need {expected} data bytes, "
            f"found {found_bytes}"
        )
    if found_bytes > expected:
        raise ValueError(
            f"{path}: IDX file has {found_bytes - expected} bytes after the {expected} data "
            f"bytes its dimensions {dims} describe"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = find_file(directory, split, "images")
    labels_path = find_file(directory, split, "labels")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        have, missing = (images_path, "labels") if labels_path is None else (labels_path, "images")
        raise ValueError(
            f"{directory}: found {have.name} but no {split} {missing} file "
            f"(one of {', '.join(_candidates(split, missing))})"
        )
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return images, labels


def read_mnist_idx(directory: str | Path, resolution: int) -> ImageSet:
    """The train pair (then the t10k pair, if present) as grey (N, 1, resolution, resolution)."""
    directory = Path(directory)
    if find_file(directory, "train", "images") is None:
        names = ", ".join(_candidates("train", "images"))
        raise ValueError(f"{directory}: no MNIST training images (one of {names})")
    parts = [p for p in (_read_split(directory, s) for s in SPLITS) if p is not None]
    sizes = {p[0].shape[1:] for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"{directory}: train and t10k images differ in size: {sorted(sizes)}")
    images = np.concatenate([p[0] for p in parts])[:, None]
    labels = check_labels(np.concatenate([p[1] for p in parts]), directory)
    return ImageSet(resize(np.ascontiguousarray(images), resolution), labels)
