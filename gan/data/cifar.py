"""CIFAR-10 in its "python version" batches (the extracted ``cifar-10-batches-py`` folder).

The folder holds ``data_batch_1`` .. ``data_batch_5`` and, optionally, ``test_batch``, which is
appended after the training batches. Each is a pickled dict with ``b"data"``: uint8 (N, 3072),
one row per image, channel-major (1,024 red, then 1,024 green, then 1,024 blue values, each
row-major 32×32), and ``b"labels"``: N integers.

Security: the batches are pickles, and unpickling runs code named in the file. Read only files
you trust (the official archive, on a local disk), exactly as with the reference loader
(``pickle.load(f, encoding="bytes")``) that this module uses.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from gan.data.arrays import ImageSet, resize
from gan.data.common import check_labels

SHAPE = (3, 32, 32)
_BATCH = re.compile(r"data_batch_(\d+)")
TEST_BATCH = "test_batch"


def batch_files(directory: Path) -> list[Path]:
    """``data_batch_<n>`` in numeric order, then ``test_batch`` if present."""
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if p.is_file() and (m := _BATCH.fullmatch(p.name))
    ]
    files = [p for _, p in sorted(found)]
    if files and (directory / TEST_BATCH).is_file():
        files.append(directory / TEST_BATCH)
    return files


def is_cifar_dir(path: Path) -> bool:
    """True for a folder holding at least one ``data_batch_<n>`` file."""
    return path.is_dir() and bool(batch_files(path))


def _get(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: CIFAR batch has no {key!r} entry; keys: {sorted(map(str, batch))}")


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 (N, 3, 32, 32) images and int64 labels. Trusted files only."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling raises many types; all mean "not a CIFAR batch"
        raise ValueError(
            f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = np.asarray(_get(batch, "data", path))
    size = int(np.prod(SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise ValueError(f"{path}: 'data' must be uint8 (N, {size}), got {data.dtype} {data.shape}")
    labels = check_labels(np.asarray(_get(batch, "labels", path)), path)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(len(data), *SHAPE), labels


def read_cifar10(directory: str | Path, resolution: int) -> ImageSet:
    """All batches of ``directory`` as RGB (N, 3, resolution, resolution)."""
    directory = Path(directory)
    files = batch_files(directory)
    if not files:
        raise ValueError(f"{directory}: no CIFAR-10 data_batch_<n> files")
    parts = [read_batch(p) for p in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(resize(np.ascontiguousarray(images), resolution), labels)
