"""Source formats read into an ImageSet at the configured resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gan.data.arrays import ImageSet, resize

SOURCES = ("digits", "path/to/file.npz")


def load_digits(resolution: int) -> ImageSet:
    """scikit-learn's 1,797 8×8 digits (shipped with the package: nothing is downloaded).

    Pixel values 0..16 are scaled to 0..255, then resized bilinearly to ``resolution``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None, :, :]
    return ImageSet(resize(images, resolution), bunch.target.astype(np.int64))


def load_npz(path: Path, resolution: int) -> ImageSet:
    """An ``.npz`` with ``images`` uint8 (N, H, W) or (N, C, H, W) and integer ``labels`` (N,)."""
    with np.load(path) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{path}: missing arrays {sorted(missing)}; need 'images' and 'labels'"
            )
        images, labels = archive["images"], archive["labels"]
    if images.ndim == 3:
        images = images[:, None]
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 0..255, got {images.dtype}")
    return ImageSet(resize(images, resolution), labels.astype(np.int64))


def load_source(source: str, resolution: int) -> ImageSet:
    """Read ``source`` ('digits' or a path to an .npz file) at ``resolution``."""
    if source == "digits":
        return load_digits(resolution)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.source: no such file {str(path)!r}; use 'digits' or a path to an .npz file"
        )
    if path.suffix != ".npz":
        raise ValueError(f"data.source: {str(path)!r} is not an .npz file; use 'digits' or a .npz")
    return load_npz(path, resolution)
