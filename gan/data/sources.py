"""Source formats read into an ImageSet at the configured resolution.

``read_source`` finds the format of ``data.source`` (``detect_format``) and calls its reader;
``load_source`` is the same, returning only the images (and failing on any bad file).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gan.data.arrays import ImageSet, resize
from gan.data.cifar import is_cifar_dir, read_cifar10
from gan.data.common import IMAGE_EXTENSIONS, check_labels, check_on_bad, is_hidden
from gan.data.image_folder import has_class_images, is_image_file, read_image_folder
from gan.data.mnist_idx import is_mnist_dir, read_mnist_idx
from gan.data.parquet_source import is_parquet, read_parquet_source

FORMATS: dict[str, str] = {
    "digits": "'digits': scikit-learn's bundled 8×8 digits",
    "npz": "a .npz file with uint8 'images' (N, H, W) or (N, C, H, W) and integer 'labels'",
    "mnist_idx": (
        "an MNIST IDX folder: train-images-idx3-ubyte + train-labels-idx1-ubyte (or .gz), "
        "optionally the t10k- pair"
    ),
    "cifar10": (
        "a CIFAR-10 python folder (cifar-10-batches-py): data_batch_1..5, optional test_batch"
    ),
    "parquet": (
        "a Parquet file or folder of .parquet files: column 'image' (PNG/JPEG bytes or uint8 "
        "pixels) and integer column 'label'"
    ),
    "image_folder": (
        f"an image folder: one sub-folder per class holding {'/'.join(IMAGE_EXTENSIONS)} files"
    ),
}
SOURCES = tuple(FORMATS.values())

_SUPPORTED = "supported formats: " + "; ".join(SOURCES)
_INNER_FILE = re.compile(r"(train|t10k)-(images|labels)[-.]idx[13]-ubyte(\.gz)?|data_batch_\d+")
_ARCHIVE = re.compile(r".*\.(tar|tar\.gz|tgz|zip|tar\.bz2|tar\.xz)", re.IGNORECASE)


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
    labels = check_labels(labels, f"{path}: 'labels'")
    return ImageSet(resize(images, resolution), labels)


def _unrecognised(path: Path, what: str, hint: str = "") -> ValueError:
    return ValueError(f"data.source: {str(path)!r} is {what}{hint}; {_SUPPORTED}")


def detect_format(source: str | Path) -> str:
    """The format of ``source``: one of the keys of ``FORMATS``.

    Raises FileNotFoundError (naming data.source) for a missing path and ValueError, listing
    the supported formats, for a path that is none of them.
    """
    if str(source) == "digits":
        return "digits"
    path = Path(source).expanduser()
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"data.source: no such file {str(path)!r}; {_SUPPORTED}")
        return "npz"
    if not path.exists():
        raise FileNotFoundError(f"data.source: no such file or folder {str(path)!r}; {_SUPPORTED}")
    if path.is_file():
        if is_parquet(path):
            return "parquet"
        hint = ""
        if _INNER_FILE.fullmatch(path.name):
            hint = f" (a file of a dataset folder: set data.source to {str(path.parent)!r})"
        elif _ARCHIVE.fullmatch(path.name):
            hint = " (an archive: extract it and point data.source at the extracted folder)"
        raise _unrecognised(path, "not a recognised dataset file", hint)
    if is_mnist_dir(path):
        return "mnist_idx"
    if is_cifar_dir(path):
        return "cifar10"
    if is_parquet(path):
        return "parquet"
    if has_class_images(path) or any(is_image_file(p) for p in path.iterdir()):
        return "image_folder"
    empty = not any(not is_hidden(p) for p in path.iterdir())
    what = "an empty folder" if empty else "a folder in no recognised dataset layout"
    raise _unrecognised(path, what)


def read_source(
    source: str, resolution: int, *, on_bad: str = "fail"
) -> tuple[ImageSet, list[dict[str, str]]]:
    """Read ``source`` in whichever supported format it is, at ``resolution``.

    Returns the images and the files skipped with ``on_bad="skip"`` (``{"file", "reason"}``
    each; only the image-folder reader skips, the others fail on any bad file).
    """
    check_on_bad(on_bad)
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int | np.integer)
        or resolution < 1
    ):
        raise ValueError(f"data.resolution must be a positive int, got {resolution!r}")
    fmt = detect_format(source)
    path = Path(source).expanduser()
    skipped: list[dict[str, str]] = []
    if fmt == "digits":
        data = load_digits(resolution)
    elif fmt == "npz":
        data = load_npz(path, resolution)
    elif fmt == "mnist_idx":
        data = read_mnist_idx(path, resolution)
    elif fmt == "cifar10":
        data = read_cifar10(path, resolution)
    elif fmt == "parquet":
        data = read_parquet_source(path, resolution)
    else:
        data, skipped = read_image_folder(path, resolution, on_bad=on_bad)
    return data, skipped


def load_source(source: str, resolution: int) -> ImageSet:
    """Read ``source`` (any format of ``FORMATS``) at ``resolution``; any bad file is an error."""
    return read_source(source, resolution)[0]
