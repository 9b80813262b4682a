"""gan.data readers: MNIST IDX, CIFAR-10 batches, image folders, Parquet, and the dispatcher.

Every test writes its own small files under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gan.data import ImageSet, load_source
from gan.data.arrays import resize
from gan.data.cifar import read_cifar10
from gan.data.image_folder import BadImagesError, class_names, read_image_folder
from gan.data.mnist_idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_mnist_idx
from gan.data.parquet_source import read_parquet_source
from gan.data.shards import to_table
from gan.data.sources import FORMATS, SOURCES, detect_format, read_source


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _assert_set(data: ImageSet, images: np.ndarray, labels) -> None:
    assert data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)


# ------------------------------------------------------------------------------------- MNIST IDX


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _mnist_dir(root: Path, gz: bool, with_test: bool = True, size: int = 28):
    root.mkdir(exist_ok=True)
    train = _pixels(12, (size, size), seed=1)
    train_labels = np.arange(12) % 10
    _write(root / "train-images-idx3-ubyte", _idx_bytes(train, IMAGES_MAGIC), gz)
    _write(root / "train-labels-idx1-ubyte", _idx_bytes(train_labels, LABELS_MAGIC), gz)
    images, labels = train, train_labels
    if with_test:
        test = _pixels(6, (size, size), seed=2)
        test_labels = np.array([9, 8, 7, 6, 5, 4])
        _write(root / "t10k-images-idx3-ubyte", _idx_bytes(test, IMAGES_MAGIC), gz)
        _write(root / "t10k-labels-idx1-ubyte", _idx_bytes(test_labels, LABELS_MAGIC), gz)
        images, labels = np.concatenate([train, test]), np.concatenate([train_labels, test_labels])
    return images[:, None], labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip_with_t10k_appended(tmp_path, gz):
    images, labels = _mnist_dir(tmp_path / "mnist", gz)
    data = read_mnist_idx(tmp_path / "mnist", 28)
    assert data.images.shape == (18, 1, 28, 28)
    _assert_set(data, images, labels)
    small = read_mnist_idx(tmp_path / "mnist", 16)
    assert small.images.shape == (18, 1, 16, 16)
    np.testing.assert_array_equal(small.images, resize(images, 16))
    np.testing.assert_array_equal(small.labels, labels)


def test_mnist_idx_train_only_and_dot_spelling(tmp_path):
    root = tmp_path / "fashion"
    root.mkdir()
    images = _pixels(5, (8, 8), seed=3)
    (root / "train-images.idx3-ubyte").write_bytes(_idx_bytes(images, IMAGES_MAGIC))
    (root / "train-labels.idx1-ubyte").write_bytes(_idx_bytes(np.arange(5), LABELS_MAGIC))
    _assert_set(read_mnist_idx(root, 8), images[:, None], np.arange(5))


def test_idx_bad_magic_names_the_file(tmp_path):
    _mnist_dir(tmp_path, gz=False, with_test=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    # An images header where labels are expected.
    labels.write_bytes(_idx_bytes(np.zeros((12, 2, 2), np.uint8), IMAGES_MAGIC))
    with pytest.raises(ValueError, match="bad IDX magic number 0x00000803") as info:
        read_mnist_idx(tmp_path, 28)
    assert str(labels) in str(info.value)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    with pytest.raises(ValueError, match=r"junk: bad IDX magic number 0x1f8b0800"):
        read_idx(junk, IMAGES_MAGIC)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_data_names_the_file(tmp_path, gz):
    images = _pixels(4, (6, 6))
    payload = _idx_bytes(images, IMAGES_MAGIC)
    path = _write(tmp_path / "train-images-idx3-ubyte", payload[:-5], gz)
    with pytest.raises(ValueError, match=r"truncated IDX file: dimensions \(4, 6, 6\) need 144"):
        read_idx(path, IMAGES_MAGIC)
    short_header = _write(tmp_path / "short", payload[:9])
    with pytest.raises(ValueError, match="short: truncated IDX file: 9 bytes, header needs 16"):
        read_idx(short_header, IMAGES_MAGIC)


def test_idx_truncated_gzip_stream_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(_pixels(4, (6, 6)), IMAGES_MAGIC))[:-12])
    with pytest.raises(ValueError, match="cannot read") as info:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_idx_count_mismatch_and_missing_labels(tmp_path):
    _mnist_dir(tmp_path, gz=False, with_test=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(11), LABELS_MAGIC))
    with pytest.raises(ValueError, match="holds 12 images but .* holds 11 labels"):
        read_mnist_idx(tmp_path, 28)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no train labels file"):
        read_mnist_idx(tmp_path, 28)


# -------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(path: Path, images: np.ndarray, labels, str_keys: bool = False) -> None:
    key = str if str_keys else str.encode
    batch = {key("data"): images.reshape(len(images), -1), key("labels"): list(labels)}
    path.write_bytes(pickle.dumps(batch))


def test_cifar_batches_in_numeric_order_then_test_batch(tmp_path):
    parts = {
        "data_batch_1": (_pixels(4, (3, 32, 32), seed=1), [0, 1, 2, 3]),
        "data_batch_2": (_pixels(3, (3, 32, 32), seed=2), [4, 5, 6]),
        "data_batch_10": (_pixels(2, (3, 32, 32), seed=3), [7, 8]),
        "test_batch": (_pixels(3, (3, 32, 32), seed=4), [9, 0, 1]),
    }
    for name, (images, labels) in parts.items():
        _cifar_batch(tmp_path / name, images, labels)
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}))
    order = ["data_batch_1", "data_batch_2", "data_batch_10", "test_batch"]
    data = read_cifar10(tmp_path, 32)
    _assert_set(
        data,
        np.concatenate([parts[n][0] for n in order]),
        np.concatenate([parts[n][1] for n in order]),
    )
    assert read_cifar10(tmp_path, 8).images.shape == (12, 3, 8, 8)


def test_cifar_channel_major_rows_become_red_green_blue(tmp_path):
    rows = np.zeros((4, 3072), np.uint8)
    rows[0, :1024] = 255  # red
    rows[1, 1024:2048] = 255  # green
    rows[2, 2048:] = 255  # blue
    rows[3, :1024] = np.arange(1024) % 256  # red ramp in row-major order
    (tmp_path / "data_batch_1").write_bytes(
        pickle.dumps({b"data": rows, b"labels": [3, 1, 4, 1], b"batch_label": b"x"})
    )
    data = read_cifar10(tmp_path, 32)
    assert data.images.shape == (4, 3, 32, 32)
    for i in range(3):
        expected = np.zeros((3, 32, 32), np.uint8)
        expected[i] = 255
        np.testing.assert_array_equal(data.images[i], expected)
    ramp = data.images[3, 0]
    assert ramp[0, 5] == 5  # along a row first ...
    assert ramp[1, 0] == 32  # ... then down
    assert ramp[7, 31] == (7 * 32 + 31) % 256
    assert (data.images[3, 1:] == 0).all()
    np.testing.assert_array_equal(data.labels, [3, 1, 4, 1])


def test_cifar_corrupt_or_wrong_batches_name_the_file(tmp_path):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-7])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 python batch") as info:
        read_cifar10(tmp_path, 32)
    assert str(bad) in str(info.value)
    _cifar_batch(bad, np.zeros((2, 3, 32, 32), np.uint8), [1, 2])
    data = pickle.loads(bad.read_bytes())
    del data[b"labels"]
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match="has no 'labels' entry"):
        read_cifar10(tmp_path, 32)
    _cifar_batch(bad, np.zeros((2, 3, 32, 32), np.uint8), [1, -2])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        read_cifar10(tmp_path, 32)
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"'data' must be uint8 \(N, 3072\)"):
        read_cifar10(tmp_path, 32)


# ---------------------------------------------------------------------------------- image folder


def _save(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    """Pillow picks the mode from the array: (H, W) uint8 L, (H, W, 2) LA, uint16 I;16, bool 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def _grey_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Classes b, a, c (written out of order) with 3, 2, 1 distinct 8×8 grey PNGs."""
    counts = {"b": 3, "a": 2, "c": 1}
    images, labels = [], []
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            pixels = _pixels(1, (8, 8), seed=10 * label + i)[0]
            _save(root / name / f"img{i}.png", pixels)
            images.append(pixels[None])
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_image_folder_grey_round_trip_and_labels_by_sorted_name(tmp_path):
    images, labels = _grey_folder(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    (tmp_path / ".cache").mkdir()  # hidden: not a class
    data, skipped = read_image_folder(tmp_path, 8)
    assert skipped == []
    assert data.images.shape == (6, 1, 8, 8)
    _assert_set(data, images, labels)
    assert class_names(tmp_path) == ["a", "b", "c"]
    bigger, _ = read_image_folder(tmp_path, 16)
    np.testing.assert_array_equal(bigger.images, resize(images, 16))


def test_image_folder_any_rgb_image_makes_the_set_rgb(tmp_path):
    grey = _pixels(1, (8, 8), seed=1)[0]
    rgb = _pixels(1, (8, 8, 3), seed=2)[0]
    _save(tmp_path / "a" / "grey.png", grey)
    _save(tmp_path / "b" / "rgb.PNG", rgb)
    data, _ = read_image_folder(tmp_path, 8)
    assert data.images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(data.images[0], np.repeat(grey[None], 3, axis=0))
    np.testing.assert_array_equal(data.images[1], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(data.labels, [0, 1])


def test_image_folder_grey_modes_stay_grey(tmp_path):
    base = _pixels(1, (8, 8), seed=5)[0]
    _save(tmp_path / "a" / "l.png", base)
    la = np.stack([base, np.full_like(base, 128)], axis=-1)
    _save(tmp_path / "a" / "la.png", la)
    sixteen = base.astype(np.uint16) * 257  # 16-bit grey: value / 257 gives base back
    _save(tmp_path / "b" / "i16.png", sixteen)
    _save(tmp_path / "b" / "one.png", base > 127)  # mode "1"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "b" / "flat.JPEG", "JPEG")
    data, _ = read_image_folder(tmp_path, 8)
    assert data.images.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(data.images[0, 0], base)  # a/l.png
    np.testing.assert_array_equal(data.images[1, 0], base)  # a/la.png (alpha dropped)
    assert abs(int(data.images[2, 0].astype(int).mean()) - 77) <= 1  # b/flat.JPEG
    np.testing.assert_array_equal(data.images[3, 0], base)  # b/i16.png
    np.testing.assert_array_equal(data.images[4, 0], np.where(base > 127, 255, 0))  # b/one.png


def test_image_folder_mixed_sizes_are_resized(tmp_path):
    small = _pixels(1, (8, 8), seed=1)[0]
    big = _pixels(1, (16, 16), seed=2)[0]
    odd = _pixels(1, (12, 10), seed=3)[0]
    _save(tmp_path / "x" / "0.png", small)
    _save(tmp_path / "x" / "1.png", big)
    _save(tmp_path / "y" / "2.jpg", odd, fmt="PNG")  # a PNG named .jpg: Pillow sniffs content
    data, _ = read_image_folder(tmp_path, 8)
    assert data.images.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(data.images[0, 0], small)
    np.testing.assert_array_equal(data.images[1], resize(big[None, None], 8)[0])
    np.testing.assert_array_equal(data.images[2], resize(odd[None, None], 8)[0])


def test_image_folder_corrupt_png_fails_naming_it_or_is_skipped(tmp_path):
    images, labels = _grey_folder(tmp_path)
    corrupt = tmp_path / "b" / "zz-corrupt.png"
    corrupt.write_bytes(_rng(9).bytes(300))
    truncated = tmp_path / "c" / "zz-truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(_pixels(1, (32, 32), seed=8)[0]).save(buffer, "PNG")
    truncated.write_bytes(buffer.getvalue()[:-40])
    with pytest.raises(BadImagesError, match="2 unreadable image file.*data.on_bad=skip") as info:
        read_image_folder(tmp_path, 8)
    message = str(info.value)
    assert str(corrupt) in message and str(truncated) in message
    assert isinstance(info.value, ValueError)
    assert {p["file"] for p in info.value.problems} == {str(corrupt), str(truncated)}
    with pytest.raises(BadImagesError):
        load_source(str(tmp_path), 8)  # the ImageSet-only entry point fails too

    data, skipped = read_image_folder(tmp_path, 8, on_bad="skip")
    _assert_set(data, images, labels)
    assert [s["file"] for s in skipped] == [str(corrupt), str(truncated)]
    assert all(s["reason"] for s in skipped)
    assert "cannot identify image file" in skipped[0]["reason"]


def test_image_folder_lists_at_most_ten_bad_files(tmp_path):
    _save(tmp_path / "a" / "good.png", _pixels(1, (8, 8))[0])
    for i in range(13):
        (tmp_path / "a" / f"bad{i:02d}.png").write_bytes(b"not a png")
    with pytest.raises(BadImagesError, match="13 unreadable image file") as info:
        read_image_folder(tmp_path, 8)
    message = str(info.value)
    assert "bad09.png" in message and "bad10.png" not in message
    assert "and 3 more" in message


def test_image_folder_empty_class_folder(tmp_path):
    images, labels = _grey_folder(tmp_path)
    (tmp_path / "bb").mkdir()  # sorts between b and c
    (tmp_path / "bb" / "readme.txt").write_text("no images here")
    with pytest.raises(BadImagesError, match=": 1 empty class folder: .*bb: empty") as info:
        read_image_folder(tmp_path, 8)
    assert str(tmp_path / "bb") in str(info.value)
    data, skipped = read_image_folder(tmp_path, 8, on_bad="skip")
    assert skipped == [
        {"file": str(tmp_path / "bb"), "reason": "empty class folder: no .png/.jpg/.jpeg files"}
    ]
    # Labels stay the index in the sorted class names: c is 3, 2 (bb) has no images.
    np.testing.assert_array_equal(data.labels, np.where(labels == 2, 3, labels))
    np.testing.assert_array_equal(data.images, images)


def test_image_folder_without_class_folders(tmp_path):
    _save(tmp_path / "loose.png", _pixels(1, (8, 8))[0])
    with pytest.raises(ValueError, match="no class sub-folders.*1 image file"):
        read_image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="no class sub-folders"):
        read_source(str(tmp_path), 8)  # detected as an image folder: the reader explains


def test_image_folder_refuses_unknown_on_bad(tmp_path):
    with pytest.raises(ValueError, match="data.on_bad: unknown 'ignore'; allowed: fail, skip"):
        read_image_folder(tmp_path, 8, on_bad="ignore")
    with pytest.raises(ValueError, match="data.on_bad"):
        read_source("digits", 8, on_bad="ignore")


# --------------------------------------------------------------------------------------- Parquet


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_parquet_png_bytes_column_file_and_folder(tmp_path):
    images = _pixels(7, (8, 8, 3), seed=4)
    labels = np.array([0, 1, 2, 0, 1, 2, 5])
    table = pa.table({"image": [_png(im) for im in images], "label": labels})
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(table.slice(0, 4), folder / "part-0.parquet")
    pq.write_table(table.slice(4), folder / "part-1.parquet")
    (folder / "_SUCCESS").write_text("")
    expected = images.transpose(0, 3, 1, 2)
    _assert_set(read_parquet_source(folder, 8), expected, labels)
    _assert_set(read_parquet_source(folder / "part-1.parquet", 8), expected[4:], labels[4:])
    assert read_parquet_source(folder, 4).images.shape == (7, 3, 4, 4)


def test_parquet_hugging_face_image_struct(tmp_path):
    images = _pixels(3, (8, 8), seed=6)
    structs = [{"bytes": _png(im), "path": f"{i}.png"} for i, im in enumerate(images)]
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": structs, "label": pa.array([2, 0, 1], pa.int32())}), path)
    _assert_set(read_parquet_source(path, 8), images[:, None], [2, 0, 1])


def test_parquet_ganpipe_shards_shape_from_caller_metadata_columns_or_manifest(tmp_path):
    data = ImageSet(_pixels(6, (3, 8, 8), seed=7), np.arange(6))
    table = to_table(data)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)
    _assert_set(read_parquet_source(plain, 8, shape=(3, 8, 8)), data.images, data.labels)
    with pytest.raises(ValueError, match="image shape is unknown"):
        read_parquet_source(plain, 8)

    tagged = tmp_path / "tagged.parquet"
    pq.write_table(table.replace_schema_metadata({"shape": json.dumps([3, 8, 8])}), tagged)
    _assert_set(read_parquet_source(tagged, 8), data.images, data.labels)
    assert read_parquet_source(tagged, 16).images.shape == (6, 3, 16, 16)

    columns = tmp_path / "columns.parquet"
    n = len(data)
    with_shape = table.append_column("channels", pa.array([3] * n)).append_column(
        "height", pa.array([8] * n)
    )
    pq.write_table(with_shape.append_column("width", pa.array([8] * n)), columns)
    _assert_set(read_parquet_source(columns, 8), data.images, data.labels)

    prepared = tmp_path / "dataset"
    prepared.mkdir()
    pq.write_table(table.slice(0, 4), prepared / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(4), prepared / "holdout-00000-of-00001.parquet")
    (prepared / "manifest.json").write_text(json.dumps({"shape": [3, 8, 8]}))
    back = read_parquet_source(prepared, 8)  # files in name order: holdout first
    np.testing.assert_array_equal(back.images, np.concatenate([data.images[4:], data.images[:4]]))


def test_parquet_variable_lists_and_wrong_lengths(tmp_path):
    images = _pixels(3, (1, 4, 4), seed=8)
    rows = [im.ravel().tolist() for im in images]
    path = tmp_path / "lists.parquet"
    table = pa.table({"image": pa.array(rows, pa.list_(pa.uint8())), "label": [0, 1, 2]})
    pq.write_table(table, path)
    _assert_set(read_parquet_source(path, 4, shape=(1, 4, 4)), images, [0, 1, 2])
    rows[1] = rows[1][:-1]
    table = pa.table({"image": pa.array(rows, pa.list_(pa.uint8())), "label": [0, 1, 2]})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"row 1 holds 15 pixels; shape \[1, 4, 4\] needs 16"):
        read_parquet_source(path, 4, shape=(1, 4, 4))


def test_parquet_refuses_float_pixels_float_labels_and_negative_labels(tmp_path):
    path = tmp_path / "bad.parquet"
    floats = pa.array([[0.5] * 16, [1.0] * 16], pa.list_(pa.float32(), 16))
    pq.write_table(pa.table({"image": floats, "label": [0, 1]}), path)
    with pytest.raises(ValueError, match="holds float pixels; expected uint8 0..255"):
        read_parquet_source(path, 4, shape=(1, 4, 4))
    pixels = pa.array([[0] * 16, [255] * 16], pa.list_(pa.uint8(), 16))
    pq.write_table(pa.table({"image": pixels, "label": [0.0, 1.0]}), path)
    with pytest.raises(ValueError, match="column 'label' must hold integers, got double"):
        read_parquet_source(path, 4, shape=(1, 4, 4))
    pq.write_table(pa.table({"image": pixels, "label": [0, -1]}), path)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        read_parquet_source(path, 4, shape=(1, 4, 4))
    pq.write_table(pa.table({"pixels": pixels, "label": [0, 1]}), path)
    with pytest.raises(ValueError, match=r"missing columns \['image'\]"):
        read_parquet_source(path, 4, shape=(1, 4, 4))
    wide = pa.array([[0] * 16, [256] * 16], pa.list_(pa.int16(), 16))
    pq.write_table(pa.table({"image": wide, "label": [0, 1]}), path)
    with pytest.raises(ValueError, match=r"pixel values must be 0..255, found 0..256"):
        read_parquet_source(path, 4, shape=(1, 4, 4))


def test_parquet_truncated_or_corrupt_file_names_it(tmp_path):
    data = ImageSet(_pixels(40, (1, 8, 8), seed=9), np.arange(40) % 4)
    path = tmp_path / "shard.parquet"
    pq.write_table(to_table(data), path)
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable Parquet file") as info:
        read_parquet_source(truncated, 8, shape=(1, 8, 8))
    assert str(truncated) in str(info.value)
    with pytest.raises(ValueError, match="truncated.parquet: not a readable Parquet file"):
        read_source(str(truncated), 8)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("image,label\n")
    with pytest.raises(ValueError, match="text.parquet: not a readable Parquet file"):
        read_parquet_source(not_parquet, 8)
    # A flipped pixel byte is caught where the writer stored page checksums.
    pq.write_table(to_table(data), path, write_page_checksum=True)
    flipped = bytearray(path.read_bytes())
    flipped[200] ^= 0xFF
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt.parquet: not a readable Parquet file.*CRC"):
        read_parquet_source(corrupt, 8, shape=(1, 8, 8))


def test_parquet_undecodable_image_bytes_name_file_and_row(tmp_path):
    path = tmp_path / "enc.parquet"
    column = [_png(_pixels(1, (8, 8))[0]), b"garbage"]
    pq.write_table(pa.table({"image": column, "label": [0, 1]}), path)
    with pytest.raises(ValueError, match="enc.parquet: row 1: cannot decode the image bytes"):
        read_parquet_source(path, 8)


# ------------------------------------------------------------------------------- detect and read


@pytest.fixture
def every_format(tmp_path) -> dict[str, Path]:
    paths = {}
    paths["npz"] = tmp_path / "set.npz"
    np.savez(paths["npz"], images=_pixels(4, (8, 8)), labels=np.arange(4))
    paths["mnist_idx"] = tmp_path / "mnist"
    _mnist_dir(paths["mnist_idx"], gz=True, size=8)
    paths["cifar10"] = tmp_path / "cifar-10-batches-py"
    paths["cifar10"].mkdir()
    _cifar_batch(paths["cifar10"] / "data_batch_1", _pixels(3, (3, 32, 32)), [0, 1, 2], True)
    paths["parquet"] = tmp_path / "pngs.parquet"
    table = pa.table({"image": [_png(im) for im in _pixels(3, (8, 8))], "label": [0, 1, 1]})
    pq.write_table(table, paths["parquet"])
    paths["parquet_dir"] = tmp_path / "shards"
    paths["parquet_dir"].mkdir()
    pq.write_table(table, paths["parquet_dir"] / "a.parquet")
    paths["parquet_no_suffix"] = tmp_path / "data"
    paths["parquet_no_suffix"].write_bytes(paths["parquet"].read_bytes())
    paths["image_folder"] = tmp_path / "folder"
    _grey_folder(paths["image_folder"])
    return paths


def test_detect_format_on_each(every_format):
    assert detect_format("digits") == "digits"
    formats = {"parquet_dir": "parquet", "parquet_no_suffix": "parquet"}
    for name, path in every_format.items():
        assert detect_format(str(path)) == formats.get(name, name), name
    assert set(FORMATS) == {"digits", "npz", "mnist_idx", "cifar10", "parquet", "image_folder"}
    assert len(SOURCES) == len(FORMATS)


def test_read_source_dispatches_to_each_reader(every_format):
    expected = {
        "npz": (4, 1),
        "mnist_idx": (18, 1),
        "cifar10": (3, 3),
        "parquet": (3, 1),
        "parquet_dir": (3, 1),
        "parquet_no_suffix": (3, 1),
        "image_folder": (6, 1),
    }
    for name, path in every_format.items():
        data, skipped = read_source(str(path), 16)
        assert skipped == []
        assert data.images.shape == (expected[name][0], expected[name][1], 16, 16), name
        assert data.labels.dtype == np.int64
        via_load = load_source(str(path), 16)
        np.testing.assert_array_equal(via_load.images, data.images)
    digits, skipped = read_source("digits", 8)
    assert len(digits) == 1797 and skipped == []


def test_unknown_format_lists_the_supported_formats(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("hi")
    (odd / "sub").mkdir()
    for path in (odd, tmp_path / "x.csv"):
        path.touch()
        with pytest.raises(ValueError, match="data.source") as info:
            detect_format(path)
        message = str(info.value)
        for needle in (".npz", "MNIST IDX", "CIFAR-10", "Parquet", "image folder", "'digits'"):
            assert needle in message, needle
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="an empty folder"):
        detect_format(empty)


def test_detect_format_hints(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="an archive: extract it"):
        detect_format(archive)
    inner = tmp_path / "train-images-idx3-ubyte.gz"
    inner.write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="set data.source to"):
        read_source(str(inner), 8)


def test_missing_source_mentions_data_source(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data.source: no such file or folder") as info:
        read_source(str(missing), 8)
    assert str(missing) in str(info.value)


def test_npz_negative_labels_are_refused(tmp_path):
    path = tmp_path / "neg.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, -3]))
    with pytest.raises(ValueError, match="labels must be >= 0, found -3"):
        load_source(str(path), 8)
