"""Compact local descriptors in the feature store (extraction.descriptor_dtype): float16 and per-vector
int8, encoded on put, float32 on every read, within their error bounds, covered by the checksum."""

import h5py
import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction.features import (
    DESCRIPTOR_DTYPES,
    INT8_LEVELS,
    LocalFeatures,
    StoredFeatures,
    decode_descriptors,
    encode_descriptors,
    features_checksum,
)
from src.extraction.store import FeatureStore
from src.extraction.store_reader import DamagedImageError


def unit_descriptors(count: int = 300, depth: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(count, depth)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    descriptors[0] = 0.0  # a zero row: scale 0, decoded exactly
    descriptors[1, :] = 0.0
    descriptors[1, 5] = -1.0  # a one-hot row: the peak is exact
    descriptors[2] *= 1e-6  # tiny values: float16 subnormals
    return descriptors


def features_with(descriptors: np.ndarray) -> LocalFeatures:
    count = len(descriptors)
    rng = np.random.default_rng(1)
    return LocalFeatures(rng.uniform(0, 500, (count, 2)).astype(np.float32), np.ones(count, np.float32),
                         descriptors, np.full(count, 2.0, np.float32))


def test_float16_error_bound():
    descriptors = unit_descriptors()
    codes, scales = encode_descriptors("x", descriptors, "float16")
    assert codes.dtype == np.float16 and scales is None
    decoded = decode_descriptors(codes, scales)
    assert decoded.dtype == np.float32
    # Round to nearest: half a unit in the last place, 2^-11 relative for normal numbers, 2^-25 below 2^-14.
    bound = np.maximum(np.abs(descriptors) * 2.0**-11, 2.0**-25)
    assert (np.abs(decoded - descriptors) <= bound).all()
    assert np.abs(decoded - descriptors).max() > 0  # it does round


def test_int8_error_bound_and_symmetry():
    descriptors = unit_descriptors()
    codes, scales = encode_descriptors("x", descriptors, "int8")
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (len(descriptors),)
    assert codes.min() >= -INT8_LEVELS and codes.max() <= INT8_LEVELS
    decoded = decode_descriptors(codes, scales)
    assert decoded.dtype == np.float32
    peaks = np.abs(descriptors).max(axis=1, keepdims=True)
    # Half a step, s / 2 = max|x| / 254, plus float32 rounding of the product.
    assert (np.abs(decoded - descriptors) <= peaks / (2 * INT8_LEVELS) * (1 + 1e-5) + 1e-12).all()
    np.testing.assert_array_equal(decoded[0], 0.0)
    np.testing.assert_array_equal(decoded[1], descriptors[1])  # the peak itself is exact: code +-127
    assert np.abs(codes).max(axis=1)[1:].min() == INT8_LEVELS  # every non-zero row uses the full range
    negated, _ = encode_descriptors("x", -descriptors, "int8")
    np.testing.assert_array_equal(negated, -codes)
    # Unit 128-D descriptors: distances (what matching thresholds) move by far less than DELG's 1.0.
    pairs = np.linalg.norm(descriptors[3:, None] - descriptors[None, 3:], axis=2)
    pairs_decoded = np.linalg.norm(decoded[3:, None] - decoded[None, 3:], axis=2)
    assert np.abs(pairs - pairs_decoded).max() < 0.02


def test_float16_refuses_values_out_of_range():
    with pytest.raises(InputError, match=r"descriptors of 'big' exceed float16's range .* float32 or int8"):
        encode_descriptors("big", np.full((2, 3), 1e5, np.float32), "float16")
    with pytest.raises(InputError, match="unknown descriptor encoding 'int4'"):
        encode_descriptors("x", np.zeros((2, 3), np.float32), "int4")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_store_round_trip_decodes_to_float32(tmp_path, dtype):
    descriptors = unit_descriptors(count=50, depth=40)
    features = features_with(descriptors)
    codes, scales = encode_descriptors("img", descriptors, dtype)
    want = decode_descriptors(codes, scales)
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        store.put("img", features, image_size=(30, 40), settings_hash="h", descriptor_dtype=dtype)
        store.put("empty", features_with(np.zeros((0, 40), np.float32)), image_size=(30, 40), settings_hash="h",
                  descriptor_dtype=dtype)
        journal_reads = store.get("img").descriptors, store.keypoints("img").descriptors
    with FeatureStore(path) as store:
        for descriptors_read in (*journal_reads, store.get("img").descriptors, store.keypoints("img").descriptors):
            assert descriptors_read.dtype == np.float32
            np.testing.assert_array_equal(descriptors_read, want)
        got = store.get("img")
        np.testing.assert_array_equal(got.locations, features.locations)  # the rest stays float32, exact
        np.testing.assert_array_equal(got.attention, features.attention)
        assert store.get("empty").descriptors.shape == (0, 40)
        assert store.keypoints("empty").descriptors.dtype == np.float32
        assert store.stored("img").arrays.descriptor_dtype == dtype
    with h5py.File(path, "r") as h5:
        assert h5["img"]["descriptors"].dtype == np.dtype(dtype)
        # One chunk: the values plus fletcher32's 4 bytes.
        assert h5["img"]["descriptors"].id.get_storage_size() == descriptors.size * np.dtype(dtype).itemsize + 4


def test_checksum_covers_what_is_stored(tmp_path):
    descriptors = unit_descriptors(count=20, depth=16)
    codes, scales = encode_descriptors("x", descriptors, "int8")
    base = StoredFeatures(*features_with(descriptors)[:2], codes, features_with(descriptors).attention, scales)
    checksum = features_checksum(base, (3, 4), "h")
    # The same bytes read as another type, other scales, other codes: all differ.
    assert features_checksum(base._replace(descriptors=codes.view(np.uint8)), (3, 4), "h") != checksum
    assert features_checksum(base._replace(descriptor_scales=scales * 2), (3, 4), "h") != checksum
    changed = codes.copy()
    changed[4, 4] += 1
    assert features_checksum(base._replace(descriptors=changed), (3, 4), "h") != checksum
    halves = descriptors.astype(np.float16)
    as_float16 = base._replace(descriptors=halves, descriptor_scales=None)
    assert features_checksum(as_float16, (3, 4), "h") != features_checksum(
        as_float16._replace(descriptors=halves.view(np.int16)), (3, 4), "h")

    # On disk: a changed code or scale in datasets without fletcher32 fails the image's checksum,
    # and int8 codes without their scales are refused by the partial read too.
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        for image_id in ("codes", "scales", "no_scales"):
            store.put(image_id, features_with(descriptors), image_size=(3, 4), settings_hash="h",
                      descriptor_dtype="int8")
    with h5py.File(path, "a") as h5:
        for image_id, name in (("codes", "descriptors"), ("scales", "descriptor_scales")):
            values = h5[image_id][name][()]
            values[3] += np.array(1, values.dtype)
            del h5[image_id][name]
            h5[image_id].create_dataset(name, data=values)
        del h5["no_scales"]["descriptor_scales"]
    with FeatureStore(path) as store:
        for image_id in ("codes", "scales"):
            for read in (store.get, store.keypoints):  # keypoints: no fletcher32 to rely on, so the checksum
                with pytest.raises(DamagedImageError, match=rf"'{image_id}' .* damaged \(checksum"):
                    read(image_id)
        with pytest.raises(DamagedImageError, match=r"'no_scales' .* damaged \(arrays: descriptors int8 without"):
            store.keypoints("no_scales")


def test_descriptor_dtype_is_a_setting_of_the_hash():
    default = ExtractionConfig()
    assert default.descriptor_dtype == "float32"
    # The default keeps the hash stores were written with before the setting existed (value of that code).
    assert default.settings_hash("ckpt") == "f1fb70df2176910c"
    hashes = {ExtractionConfig(descriptor_dtype=dtype).settings_hash("ckpt") for dtype in DESCRIPTOR_DTYPES}
    assert len(hashes) == 3
    with pytest.raises(InputError, match="descriptor_dtype: 'int4' is not one of float32, float16, int8"):
        ExtractionConfig(descriptor_dtype="int4")
