"""Helpers shared by the dataset readers: label checks, image decoding, one channel count."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from gan.data.arrays import resize

ON_BAD = ("fail", "skip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Modes read as one grey channel; every other mode (RGB, RGBA, P, CMYK, ...) is read as RGB.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Listed in "set data.on_bad=skip" errors; the rest are counted.
MAX_LISTED = 10
# How the reason of an empty class folder starts.
EMPTY_CLASS = "empty class folder"


class BadImagesError(ValueError):
    """Files that cannot be read as images; ``problems`` holds {"file", "reason"} for each."""

    def __init__(self, message: str, problems: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.problems = problems


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise ValueError(f"data.on_bad: unknown {on_bad!r}; allowed: {', '.join(ON_BAD)}")


def bad_images_error(where: str | Path, problems: list[dict[str, str]]) -> BadImagesError:
    """The error for ``on_bad="fail"``: names the first ``MAX_LISTED`` problems."""
    listed = "; ".join(f"{p['file']}: {p['reason']}" for p in problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    if more > 0:
        listed += f"; and {more} more"
    empty = sum(p["reason"].startswith(EMPTY_CLASS) for p in problems)
    counts = [
        f"{n} {what}"
        for n, what in ((len(problems) - empty, "unreadable image file(s)"), (empty, EMPTY_CLASS))
        if n
    ]
    return BadImagesError(
        f"{where}: {' and '.join(counts)}: {listed}. "
        "Fix or remove them, or set data.on_bad=skip to skip them",
        problems,
    )


def check_labels(labels: np.ndarray, where: str | Path) -> np.ndarray:
    """1-D integer labels >= 0 as int64; integral floats are accepted, anything else refused."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ValueError(f"{where}: labels must be integers, got non-integral {labels.dtype}")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {labels.min()}")
    if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{where}: label {labels.max()} does not fit in int64")
    return labels.astype(np.int64)


def decode_image(source: str | Path | bytes) -> np.ndarray:
    """A PNG/JPEG file or its bytes -> uint8 (C, H, W), C = 1 for grey modes, else 3.

    The image is decoded completely, so truncated files raise here (Pillow's OSError) rather
    than later. 16-bit grey is scaled to 8 bits (value / 257); alpha is dropped.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    with Image.open(fp) as img:
        img.load()
        mode = img.mode
        if mode in _SIXTEEN_BIT_MODES:
            wide = np.asarray(img).astype(np.int64)
            pixels = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)[None]
        elif mode in GRAYSCALE_MODES:
            grey = img if mode == "L" else img.convert("L")
            pixels = np.asarray(grey, dtype=np.uint8)[None]
        else:
            rgb = img if mode == "RGB" else img.convert("RGB")
            pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return np.array(pixels, order="C")  # a writable copy: Pillow's buffer is read-only


def resize_one(image: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of one uint8 (C, H, W) image (``arrays.resize``)."""
    return resize(image[None], resolution)[0]


def stack_images(images: list[np.ndarray]) -> np.ndarray:
    """Same-size uint8 (C, H, W) images -> (N, C, H, W); grey ones become RGB if any is RGB.

    Grey to RGB repeats the channel (what Pillow's ``convert("RGB")`` does), so resizing
    before or after this step gives the same pixels.
    """
    if not images:
        raise ValueError("no images to stack")
    channels = max(int(im.shape[0]) for im in images)
    return np.stack(
        [im if im.shape[0] == channels else np.repeat(im, channels, axis=0) for im in images]
    )


def concat_sets(images: list[np.ndarray]) -> np.ndarray:
    """Concatenate (N_i, C_i, R, R) blocks, repeating grey blocks to RGB when needed."""
    channels = max(int(block.shape[1]) for block in images)
    found = sorted({int(block.shape[1]) for block in images})
    if any(c not in (1, channels) for c in found):
        raise ValueError(f"images with {found} channels cannot be combined into one set")
    return np.concatenate(
        [b if b.shape[1] == channels else np.repeat(b, channels, axis=1) for b in images]
    )


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")
