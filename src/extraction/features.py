"""The features of one image as the feature store keeps them, their encodings and integrity checks.

`LocalFeatures` is what extraction produces and the store returns: locations (N, 2) as (y, x) in
original-image pixels, scales (N,) = 1 / pyramid scale, descriptors (N, D), attention (N,), all
float32. `Keypoints` is the part geometric verification reads.

`StoredFeatures` is what the store writes: the same arrays with the descriptors in the store's
encoding (`DESCRIPTOR_DTYPES`, an extraction setting), plus an optional global descriptor (DELG):

- float32: as extracted (4 bytes a value);
- float16: 2 bytes a value; for values within float16's range the error is at most 2^-11 of the
  value (half a unit in the last place), or 2^-25 for values under 2^-14;
- int8: 1 byte a value plus one float32 scale per descriptor: a row x is stored as codes
  round(x / s) with s = max|x| / 127, and read as codes * s, so every value is off by at most
  s / 2 = max|x| / 254.

Readers always get float32; the checksum covers the arrays as stored.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from model_utils.cli import InputError

FIELDS = ("locations", "scales", "descriptors", "attention")
OPTIONAL_FIELDS = ("descriptor_scales", "global_descriptor")  # present only in some images
KEYPOINT_FIELDS = ("locations", "descriptors", "descriptor_scales")
DESCRIPTOR_DTYPES = ("float32", "float16", "int8")
INT8_LEVELS = 127  # codes in [-127, 127]: symmetric, so -x is stored as exactly -(x's codes)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class LocalFeatures(NamedTuple):
    locations: np.ndarray  # (N, 2) float32, (y, x) in original image pixels
    scales: np.ndarray  # (N,) float32, 1 / pyramid scale
    descriptors: np.ndarray  # (N, D) float32
    attention: np.ndarray  # (N,) float32


class Keypoints(NamedTuple):
    """What geometric verification reads of an image: LocalFeatures without scales and attention."""

    locations: np.ndarray  # (N, 2) float32, (y, x)
    descriptors: np.ndarray  # (N, D) float32


class StoredFeatures(NamedTuple):
    """One image's arrays as the store keeps them (see the module docstring)."""

    locations: np.ndarray
    scales: np.ndarray
    descriptors: np.ndarray  # (N, D) float32, float16, or int8 codes
    attention: np.ndarray
    descriptor_scales: np.ndarray | None = None  # (N,) float32, with int8 codes only
    global_descriptor: np.ndarray | None = None  # (G,) float32

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by name."""
        return {name: array for name, array in zip(self._fields, self, strict=True) if array is not None}

    @property
    def descriptor_dtype(self) -> str:
        return str(self.descriptors.dtype)


def encode_descriptors(image_id: str, descriptors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored descriptors, per-descriptor scales or None) of float32 `descriptors` in encoding `dtype`."""
    if dtype == "float32":
        return descriptors, None
    if dtype == "float16":
        if len(descriptors) and np.abs(descriptors).max() > _FLOAT16_MAX:
            raise InputError(f"descriptors of {image_id!r} exceed float16's range (largest magnitude "
                             f"{np.abs(descriptors).max():.4g}); extract with extraction.descriptor_dtype float32 "
                             "or int8")
        return descriptors.astype(np.float16), None
    if dtype == "int8":
        peaks = np.abs(descriptors).max(axis=1) if descriptors.size else np.zeros(len(descriptors), np.float32)
        scales = (peaks / INT8_LEVELS).astype(np.float32)
        divisors = np.where(scales > 0, scales, 1.0).astype(np.float32)
        codes = np.clip(np.rint(descriptors / divisors[:, None]), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return codes, scales
    raise InputError(f"unknown descriptor encoding {dtype!r}; expected one of {', '.join(DESCRIPTOR_DTYPES)}")


def decode_descriptors(descriptors: np.ndarray, descriptor_scales: np.ndarray | None) -> np.ndarray:
    """float32 descriptors from stored ones (checked by `check_stored` or `check_keypoints` first)."""
    if descriptors.dtype == np.int8:
        return descriptors.astype(np.float32) * descriptor_scales[:, None]
    return descriptors.astype(np.float32, copy=False)


def encode_features(image_id: str, features: LocalFeatures, descriptor_dtype: str = "float32",
                    global_descriptor: np.ndarray | None = None) -> StoredFeatures:
    """Checked float32 `features` (and global descriptor) as the store writes them."""
    descriptors, descriptor_scales = encode_descriptors(image_id, features.descriptors, descriptor_dtype)
    if global_descriptor is not None:
        global_descriptor = check_global_descriptor(image_id, global_descriptor)
    return StoredFeatures(features.locations, features.scales, descriptors, features.attention,
                          descriptor_scales, global_descriptor)


def _crc_array(crc: int, array: np.ndarray, tag: str = "") -> int:
    """CRC-32 of an array's shape and bytes. float32 arrays without a tag are hashed as stores
    before encodings and global descriptors did, so their checksums stay valid; any other array
    is hashed after its tag and dtype, so the same bytes read as another type do not match."""
    array = np.asarray(array)
    if tag or array.dtype != np.float32:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        crc = zlib.crc32(f"{tag}:{array.dtype.str}".encode(), crc)
    else:
        array = np.ascontiguousarray(array, dtype="<f4")
    crc = zlib.crc32(repr(array.shape).encode(), crc)
    return zlib.crc32(array.reshape(-1).view(np.uint8), crc)  # no copy


def features_checksum(features: StoredFeatures | LocalFeatures, image_size: Sequence[int], settings_hash: str) -> str:
    """CRC-32 of an image's arrays as stored (shapes, types and bytes), size and settings: 'crc32:xxxxxxxx'.

    CRC-32 catches the random damage of disks and stray writes (it is no defence against forgery)
    and runs at over 1 GB/s, so verifying a whole store on resume costs about one read of it.
    """
    crc = 0
    for array in features[: len(FIELDS)]:
        crc = _crc_array(crc, array)
    crc = zlib.crc32(np.asarray(image_size, dtype="<i8").tobytes(), crc)
    crc = zlib.crc32(settings_hash.encode("utf-8"), crc)
    if isinstance(features, StoredFeatures):  # after the legacy part: images without them keep their checksum
        for name in OPTIONAL_FIELDS:
            if getattr(features, name) is not None:
                crc = _crc_array(crc, getattr(features, name), name)
    return f"crc32:{crc:08x}"


def check_features(image_id: str, features: LocalFeatures, error: type[InputError] = InputError) -> LocalFeatures:
    """`features` as float32 arrays; `error` when their shapes disagree or a value is not finite."""
    arrays = [np.asarray(a, dtype=np.float32) for a in features]
    locations, scales, descriptors, attention = arrays
    count = locations.shape[0] if locations.ndim else -1
    shapes_ok = (
        locations.shape == (count, 2)
        and scales.shape == (count,)
        and descriptors.ndim == 2
        and descriptors.shape[0] == count
        and attention.shape == (count,)
    )
    if not shapes_ok:
        raise error(
            f"features of {image_id!r} have inconsistent shapes: locations {locations.shape}, scales "
            f"{scales.shape}, descriptors {descriptors.shape}, attention {attention.shape}"
        )
    bad = [name for name, a in zip(FIELDS, arrays, strict=True) if not np.isfinite(a).all()]
    if bad:
        raise error(f"features of {image_id!r} contain NaN or infinity in {', '.join(bad)}")
    return LocalFeatures(*arrays)


def check_global_descriptor(image_id: str, descriptor: np.ndarray, error: type[InputError] = InputError,
                            stored: bool = False) -> np.ndarray:
    """A global descriptor as a float32 (G,) array; `error` when it is not one, is empty or not finite.
    `stored`: it was read from a store, so it must be float32 already."""
    array = np.asarray(descriptor)
    if stored and array.dtype != np.float32:
        raise error(f"global descriptor of {image_id!r} is {array.dtype}, not float32")
    array = array.astype(np.float32, copy=False)
    if array.ndim != 1 or not array.size:
        raise error(f"global descriptor of {image_id!r} must be a non-empty vector, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise error(f"global descriptor of {image_id!r} contains NaN or infinity")
    return array


def _descriptor_encoding_problem(descriptors: np.ndarray, descriptor_scales: np.ndarray | None) -> str:
    """Why stored descriptors (and scales) are not a valid encoding, or ''."""
    if str(descriptors.dtype) not in DESCRIPTOR_DTYPES or descriptors.ndim != 2:
        return f"descriptors {descriptors.dtype} {descriptors.shape}"
    if (descriptors.dtype == np.int8) != (descriptor_scales is not None):
        return f"descriptors {descriptors.dtype} with{'out' if descriptor_scales is None else ''} descriptor_scales"
    if descriptor_scales is not None and (descriptor_scales.dtype != np.float32
                                          or descriptor_scales.shape != (len(descriptors),)
                                          or not np.isfinite(descriptor_scales).all()):
        return (f"descriptor_scales {descriptor_scales.dtype} {descriptor_scales.shape} for "
                f"{len(descriptors)} descriptors")
    return ""


def check_stored(image_id: str, stored: StoredFeatures, error: type[InputError]) -> LocalFeatures:
    """The float32 LocalFeatures of arrays read from a store; `error` when their types, shapes or
    values are not what a store writes."""
    plain = [stored.locations, stored.scales, stored.attention]
    if any(array.dtype != np.float32 for array in plain):
        raise error(f"arrays of {image_id!r} are {', '.join(str(a.dtype) for a in plain)}, not float32")
    problem = _descriptor_encoding_problem(stored.descriptors, stored.descriptor_scales)
    if problem:
        raise error(f"arrays of {image_id!r}: {problem}")
    if stored.global_descriptor is not None:
        check_global_descriptor(image_id, stored.global_descriptor, error, stored=True)
    decoded = decode_descriptors(stored.descriptors, stored.descriptor_scales)
    return check_features(image_id, LocalFeatures(stored.locations, stored.scales, decoded, stored.attention), error)


def check_keypoints(locations: np.ndarray, descriptors: np.ndarray, descriptor_scales: np.ndarray | None
                    ) -> Keypoints | str:
    """Keypoints (float32) of stored arrays, or why they are not valid (a string)."""
    if locations.dtype != np.float32 or locations.ndim != 2 or locations.shape[1] != 2:
        return f"locations {locations.dtype} {locations.shape}"
    problem = _descriptor_encoding_problem(descriptors, descriptor_scales)
    if problem or len(descriptors) != len(locations):
        return problem or f"{len(descriptors)} descriptors for {len(locations)} locations"
    return Keypoints(locations, decode_descriptors(descriptors, descriptor_scales))
