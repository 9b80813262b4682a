"""An existing Parquet dataset: one file, or a folder of ``*.parquet`` files read in name order.

Columns:

* ``label``: integers >= 0 (any integer type, no nulls).
* ``image``, one of

  - encoded PNG/JPEG bytes (``binary``; or a struct with a ``bytes`` field, the Hugging Face
    ``datasets`` Image layout). Decoded like the image-folder reader: grey when every image is
    grey, else RGB; each resized on its own, so sizes may differ.
  - raw pixels: a list or fixed-size list of unsigned bytes (other integer types are accepted
    when every value is 0..255; floats are refused), in (C, H, W) order: ganpipe's shard
    layout (``gan.data.shards``). Every row has the same shape, taken from the first of: the
    ``shape`` argument; the ``shape`` key of the file's schema metadata (JSON, ``[C, H, W]`` or
    ``[H, W]``); ``channels``/``height``/``width`` columns (``channels`` defaults to 1);
    the ``shape`` of a ``manifest.json`` beside the files (what ganpipe's prepare step writes).

Any file pyarrow cannot open or decode (truncated, corrupt) raises ValueError naming it. Page
checksums are verified where the writer stored them (``pq.write_table(...,
write_page_checksum=True)``); without them a flipped byte inside uncompressed pixel data cannot
be detected by any reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gan.data.arrays import ImageSet, resize
from gan.data.common import check_labels, concat_sets, decode_image, resize_one, stack_images

PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"
SHAPE_COLUMNS = ("channels", "height", "width")

Shape = tuple[int, int, int]


def _starts_with_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def parquet_files(path: Path) -> list[Path]:
    """``[path]`` for a file; the folder's own ``*.parquet``/``*.pq`` files, sorted, for a folder.

    Names starting with '.' or '_' (``_SUCCESS``, ``_metadata``) are left out.
    """
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES and p.name[0] not in "._"
    )


def is_parquet(path: Path) -> bool:
    """A file with a Parquet suffix or the ``PAR1`` magic, or a folder holding such files."""
    if path.is_file():
        return path.suffix.lower() in PARQUET_SUFFIXES or _starts_with_magic(path)
    return path.is_dir() and bool(parquet_files(path))


def _parse_shape(value, where: str) -> Shape:
    try:
        dims = [int(d) for d in value]
    except (TypeError, ValueError):
        dims = []
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{where}: shape must be [C, H, W] or [H, W] of positive ints: {value!r}")
    return dims[0], dims[1], dims[2]


def _metadata_shape(schema: pa.Schema, file: Path) -> Shape | None:
    raw = (schema.metadata or {}).get(b"shape")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw.decode(errors="replace").split(",")
    return _parse_shape(value, f"{file}: schema metadata 'shape'")


def _manifest_shape(file: Path) -> Shape | None:
    manifest = file.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        shape = json.loads(manifest.read_text()).get("shape")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{manifest}: cannot read its 'shape' ({exc})") from exc
    return None if shape is None else _parse_shape(shape, f"{manifest}: 'shape'")


def _column_shape(table: pa.Table, file: Path) -> Shape | None:
    if "height" not in table.column_names or "width" not in table.column_names:
        return None
    dims = []
    for name in SHAPE_COLUMNS:
        if name not in table.column_names:
            dims.append(1)
            continue
        values = np.unique(table.column(name).to_numpy(zero_copy_only=False))
        if len(values) != 1:
            raise ValueError(
                f"{file}: column {name!r} varies between rows ({values[:5].tolist()}...); raw "
                "pixel rows must share one shape: store encoded PNG bytes for mixed sizes"
            )
        dims.append(values[0])
    return _parse_shape(dims, f"{file}: columns {'/'.join(SHAPE_COLUMNS)}")


def _read_table(file: Path) -> tuple[pa.Table, pa.Schema]:
    try:
        with pq.ParquetFile(file, page_checksum_verification=True) as pf:
            schema = pf.schema_arrow
            missing = {"image", "label"} - set(schema.names)
            if missing:
                raise ValueError(
                    f"{file}: missing columns {sorted(missing)}; need 'image' and 'label' "
                    f"(found {schema.names})"
                )
            columns = [c for c in ("image", "label", *SHAPE_COLUMNS) if c in schema.names]
            return pf.read(columns=columns), schema
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{file}: not a readable Parquet file ({exc})") from exc


def _labels(table: pa.Table, file: Path) -> np.ndarray:
    column = table.column("label")
    if not pa.types.is_integer(column.type):
        raise ValueError(f"{file}: column 'label' must hold integers, got {column.type}")
    if column.null_count:
        raise ValueError(f"{file}: column 'label' has {column.null_count} null(s)")
    return check_labels(column.to_numpy(), f"{file}: column 'label'")


def _encoded(column: pa.Array, file: Path, resolution: int) -> np.ndarray:
    images = []
    for row, value in enumerate(column.to_pylist()):
        if value is None:
            raise ValueError(f"{file}: row {row}: 'image' is null")
        try:
            pixels = decode_image(value)
        except MemoryError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            raise ValueError(
                f"{file}: row {row}: cannot decode the image bytes ({type(exc).__name__}: {exc})"
            ) from exc
        images.append(resize_one(pixels, resolution))
    return stack_images(images)


def _pixels(column: pa.Array, shape: Shape, file: Path) -> np.ndarray:
    value_type = column.type.value_type
    if pa.types.is_floating(value_type):
        raise ValueError(
            f"{file}: column 'image' holds {value_type} pixels; expected uint8 0..255 "
            "(scale and cast to uint8 before writing)"
        )
    if not pa.types.is_integer(value_type):
        raise ValueError(f"{file}: column 'image' holds {value_type}; expected uint8 pixels")
    size = int(np.prod(shape))
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(len(column), column.type.list_size)
    else:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != size).any():
        bad = int(np.flatnonzero(lengths != size)[0])
        raise ValueError(
            f"{file}: row {bad} holds {lengths[bad]} pixels; shape {list(shape)} needs {size}"
        )
    values = column.flatten()
    if values.null_count:
        raise ValueError(f"{file}: column 'image' has null pixels")
    flat = np.array(values.to_numpy(zero_copy_only=False))  # a writable copy for torch
    if flat.dtype != np.uint8:
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise ValueError(
                f"{file}: pixel values must be 0..255, found {flat.min()}..{flat.max()}"
            )
        flat = flat.astype(np.uint8)
    return flat.reshape(len(column), *shape)


def read_parquet_file(
    file: str | Path, resolution: int, *, shape: Shape | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One file -> uint8 (N, C, resolution, resolution) images and int64 labels."""
    file = Path(file)
    table, schema = _read_table(file)
    labels = _labels(table, file)
    column = table.column("image").combine_chunks()
    if column.null_count:
        raise ValueError(f"{file}: column 'image' has {column.null_count} null(s)")
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        column, kind = column.field("bytes"), kind.field("bytes").type
    if len(column) == 0:
        return np.zeros((0, 1, resolution, resolution), np.uint8), labels
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _encoded(column, file, resolution), labels
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        shape = (
            (_parse_shape(shape, "shape") if shape is not None else None)
            or _metadata_shape(schema, file)
            or _column_shape(table, file)
            or _manifest_shape(file)
        )
        if shape is None:
            raise ValueError(
                f"{file}: column 'image' holds raw pixels but the image shape is unknown: pass "
                "shape=(C, H, W), add a 'shape' key to the schema metadata, or add "
                "height/width (and channels) columns"
            )
        return resize(_pixels(column, shape, file), resolution), labels
    raise ValueError(
        f"{file}: column 'image' has type {kind}; expected PNG/JPEG bytes (binary) or a list "
        "of uint8 pixels"
    )


def read_parquet_source(
    path: str | Path, resolution: int, *, shape: Shape | None = None
) -> ImageSet:
    """A Parquet file, or a folder of them, as one ImageSet at ``resolution``."""
    path = Path(path)
    files = parquet_files(path)
    if not files:
        raise ValueError(f"{path}: no .parquet files")
    parts = [read_parquet_file(f, resolution, shape=shape) for f in files]
    parts = [p for p in parts if len(p[1])]
    if not parts:
        raise ValueError(f"{path}: the Parquet data holds no rows")
    images = concat_sets([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(images, labels)
