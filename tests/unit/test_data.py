"""gan.data: the digits and .npz readers, the ImageSet checks, and the Parquet shard layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from gan.data import ImageSet, load_source, to_model_range
from gan.data.arrays import from_model_range, resize
from gan.data.shards import content_digest, from_table, split_shards, to_table
from gan.data.sources import load_digits


@pytest.fixture(scope="module")
def digits8() -> ImageSet:
    return load_digits(8)


def _random_set(n: int = 7, shape=(3, 5, 4), seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return ImageSet(images, rng.integers(0, 10, size=n).astype(np.int64))


# ---------------------------------------------------------------------------------------- digits


def test_digits_at_8_are_the_sklearn_pixels_scaled_to_255(digits8):
    bunch = sklearn_digits()
    expected = np.round(bunch.images * 255 / 16).astype(np.uint8)
    assert digits8.images.shape == (1797, 1, 8, 8)
    assert digits8.images.dtype == np.uint8
    np.testing.assert_array_equal(digits8.images[:, 0], expected)
    np.testing.assert_array_equal(digits8.labels, bunch.target)
    assert digits8.labels.dtype == np.int64
    assert digits8.images.min() == 0
    assert digits8.images.max() == 255  # 16 -> 255
    assert len(digits8) == 1797
    assert digits8.shape == (1, 8, 8)


def test_digits_at_16_are_upsampled_uint8(digits8):
    d16 = load_source("digits", 16)
    assert d16.images.shape == (1797, 1, 16, 16)
    assert d16.images.dtype == np.uint8
    np.testing.assert_array_equal(d16.labels, digits8.labels)
    # Bilinear with align_corners=False keeps the corner pixels exactly.
    for r16, r8 in ((0, 0), (15, 7)):
        for c16, c8 in ((0, 0), (15, 7)):
            np.testing.assert_array_equal(d16.images[:, 0, r16, c16], digits8.images[:, 0, r8, c8])
    # and the image content: a 2x2 block average stays close to the source pixel.
    pooled = d16.images.reshape(1797, 1, 8, 2, 8, 2).astype(float).mean(axis=(3, 5))
    assert np.abs(pooled - digits8.images).mean() < 20
    assert np.corrcoef(pooled.ravel(), digits8.images.ravel())[0, 1] > 0.95


def test_load_source_digits_equals_load_digits(digits8):
    via_source = load_source("digits", 8)
    np.testing.assert_array_equal(via_source.images, digits8.images)
    np.testing.assert_array_equal(via_source.labels, digits8.labels)


# -------------------------------------------------------------------------------------- ImageSet


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2), "uint8"),
        (np.zeros((2, 1, 4, 4), np.int64), np.zeros(2), "uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2), r"\(N, C, H, W\)"),
        (np.zeros((2, 1, 1, 4, 4), np.uint8), np.zeros(2), r"\(N, C, H, W\)"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3), r"labels must have shape \(2,\)"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.zeros((2, 1)), r"labels must have shape \(2,\)"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.zeros(()), r"labels must have shape \(2,\)"),
    ],
)
def test_imageset_refuses_bad_arrays(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ImageSet(images, labels)


def test_imageset_accepts_the_layout():
    data = _random_set(n=4, shape=(3, 2, 5))
    assert len(data) == 4
    assert data.shape == (3, 2, 5)


def test_model_range_round_trip_is_exact_for_every_pixel_value():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0
    np.testing.assert_array_equal(from_model_range(x), pixels)
    # Out-of-range generator outputs are clipped, not wrapped.
    clipped = from_model_range(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]))
    np.testing.assert_array_equal(clipped, [0, 0, 128, 255, 255])


def test_resize_is_a_no_op_at_the_same_size_and_keeps_constants():
    data = _random_set(n=2, shape=(1, 8, 8)).images
    assert resize(data, 8) is data
    constant = np.full((2, 3, 5, 5), 77, np.uint8)
    out = resize(constant, 16)
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == np.uint8
    assert (out == 77).all()


# --------------------------------------------------------------------------------------- sources


def test_load_source_refuses_a_missing_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="data.source") as info:
        load_source(str(missing), 8)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("name", ["images.txt", "images.npy", "images"])
def test_load_source_refuses_a_non_npz_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="data.source") as info:
        load_source(str(path), 8)
    assert ".npz" in str(info.value)


def test_load_source_refuses_a_directory(tmp_path):
    folder = tmp_path / "dir.npz"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="data.source"):
        load_source(str(folder), 8)


def test_npz_with_nhw_images_loads_and_resizes(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=labels)

    same = load_source(str(path), 8)
    assert same.images.shape == (6, 1, 8, 8)
    np.testing.assert_array_equal(same.images[:, 0], images)
    np.testing.assert_array_equal(same.labels, labels)
    assert same.labels.dtype == np.int64

    bigger = load_source(str(path), 16)
    assert bigger.images.shape == (6, 1, 16, 16)
    assert bigger.images.dtype == np.uint8
    np.testing.assert_array_equal(bigger.images[:, 0, 0, 0], images[:, 0, 0])
    np.testing.assert_array_equal(bigger.images[:, 0, 15, 15], images[:, 7, 7])

    smaller = load_source(str(path), 4)
    assert smaller.images.shape == (6, 1, 4, 4)
    # Halving with bilinear (align_corners=False) averages each 2x2 block.
    block_mean = images.reshape(6, 4, 2, 4, 2).astype(float).mean(axis=(2, 4))
    assert np.abs(smaller.images[:, 0].astype(float) - block_mean).max() <= 0.5


def test_npz_with_nchw_images_keeps_channels(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez_compressed(path, images=images, labels=np.arange(3))
    data = load_source(str(path), 8)
    np.testing.assert_array_equal(data.images, images)


def test_npz_missing_labels_raises(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(
        ValueError, match=r"missing arrays \['labels'\]; need 'images' and 'labels'"
    ):
        load_source(str(path), 8)


def test_npz_missing_both_arrays_names_both(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ValueError, match=r"missing arrays \['images', 'labels'\]"):
        load_source(str(path), 8)


def test_npz_float_images_raise(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="'images' must be uint8 0..255, got float32"):
        load_source(str(path), 8)


def test_npz_label_count_mismatch_raises(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        load_source(str(path), 8)


# ---------------------------------------------------------------------------------------- shards


def test_table_round_trip_is_exact():
    data = _random_set(n=9, shape=(3, 5, 4))
    table = to_table(data)
    assert table.num_rows == 9
    assert table.schema.field("image").type == pa.list_(pa.uint8(), 60)
    assert table.schema.field("label").type == pa.int64()
    back = from_table(table, (3, 5, 4))
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.labels, data.labels)
    assert back.images.dtype == np.uint8
    assert back.labels.dtype == np.int64
    # Row i holds image i in C, H, W order.
    assert table.column("image")[4].as_py() == data.images[4].ravel().tolist()


def test_parquet_round_trip_is_exact(tmp_path):
    data = _random_set(n=25, shape=(1, 8, 8), seed=3)
    path = tmp_path / "shard.parquet"
    pq.write_table(to_table(data), path, row_group_size=7)  # several chunks on read
    back = from_table(pq.read_table(path), (1, 8, 8))
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.labels, data.labels)
    assert content_digest(back) == content_digest(data)


def test_from_table_with_wrong_shape_raises():
    table = to_table(_random_set(n=2, shape=(1, 4, 4)))
    with pytest.raises(ValueError, match="shard rows hold 16 pixels, expected 64"):
        from_table(table, (1, 8, 8))
    with pytest.raises(ValueError, match="expected 48"):
        from_table(table, (3, 4, 4))


def test_content_digest_equal_for_equal_data():
    a = _random_set(seed=4)
    b = ImageSet(a.images.copy(), a.labels.copy())
    assert content_digest(a) == content_digest(b)
    assert len(content_digest(a)) == 64
    # Memory layout does not matter.
    fortran = ImageSet(np.asfortranarray(a.images), a.labels)
    assert content_digest(fortran) == content_digest(a)


def test_content_digest_changes_with_one_pixel_or_one_label():
    a = _random_set(seed=5)
    pixel = a.images.copy()
    pixel[3, 1, 2, 0] ^= 1
    label = a.labels.copy()
    label[6] += 1
    digests = {
        content_digest(a),
        content_digest(ImageSet(pixel, a.labels)),
        content_digest(ImageSet(a.images, label)),
        # Same bytes, different image shape.
        content_digest(ImageSet(a.images.reshape(7, 3, 4, 5), a.labels)),
    }
    assert len(digests) == 4


@pytest.mark.parametrize(("n", "shards"), [(10, 3), (7, 7), (100, 4), (5, 1), (11, 4)])
def test_split_shards_partitions_nearly_equally(n, shards):
    data = _random_set(n=n, shape=(1, 2, 2), seed=n)
    parts = split_shards(data, shards)
    assert len(parts) == shards
    sizes = [len(p) for p in parts]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), data.images)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), data.labels)
