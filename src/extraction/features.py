"""The local features of one image as the feature store keeps them, and their integrity checks.

`LocalFeatures` is what extraction produces and the store returns: locations (N, 2) as (y, x) in
original-image pixels, scales (N,) = 1 / pyramid scale, descriptors (N, D), attention (N,).
`Keypoints` is the part geometric verification reads.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from model_utils.cli import InputError

FIELDS = ("locations", "scales", "descriptors", "attention")
KEYPOINT_FIELDS = ("locations", "descriptors")


class LocalFeatures(NamedTuple):
    locations: np.ndarray  # (N, 2) float32, (y, x) in original image pixels
    scales: np.ndarray  # (N,) float32, 1 / pyramid scale
    descriptors: np.ndarray  # (N, D) float32
    attention: np.ndarray  # (N,) float32


class Keypoints(NamedTuple):
    """What geometric verification reads of an image: LocalFeatures without scales and attention."""

    locations: np.ndarray  # (N, 2) float32, (y, x)
    descriptors: np.ndarray  # (N, D) float32



def features_checksum(features: LocalFeatures, image_size: Sequence[int], settings_hash: str) -> str:
    """CRC-32 of an image's arrays (shapes and float32 bytes), size and settings: 'crc32:xxxxxxxx'.

    CRC-32 catches the random damage of disks and stray writes (it is no defence against forgery)
    and runs at over 1 GB/s, so verifying a whole store on resume costs about one read of it.
    """
    crc = 0
    for array in features:
        array = np.ascontiguousarray(array, dtype="<f4")
        crc = zlib.crc32(repr(array.shape).encode(), crc)
        crc = zlib.crc32(array.reshape(-1).view(np.uint8), crc)  # no copy
    crc = zlib.crc32(np.asarray(image_size, dtype="<i8").tobytes(), crc)
    crc = zlib.crc32(settings_hash.encode("utf-8"), crc)
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
