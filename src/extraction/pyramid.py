"""The image pyramid, in plain NumPy: which sizes each image is run at, and the network input of each level.

Shared by direct extraction and the Ascend-310 preprocess, so both feed the network the same
pixels. Level sizes follow src/extraction/geometry.py; inputs are NCHW, normalised as
(x - 128) / 128. `extraction.resize` chooses how levels are made:
- pillow: Pillow's bilinear filter from the original uint8 image to each level, then normalised
  (this suite's models);
- tf_legacy: TF1 DELF's extractor: the uint8 image is first resized with Pillow when
  max/min_image_size (or the memory bound) asks for it, then normalised, then each level is
  resized as TF1's tf.image.resize_bilinear (align_corners=False, half_pixel_centers=False) does,
  in float32: what the released TF DELF models' own extraction graph feeds the network.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model_utils.config import ExtractionConfig
from src.extraction import geometry
from src.extraction.images import crop_to_box, load_image, read_image, resize_image

LOGGER = logging.getLogger("delf.extract")

MIN_IMAGE_SIDE = 10  # smaller images give no features (as the TF reference)
# Keras backbone: conv1 (7x7/2, 'same') gives ceil(n / 2) rows and the 3x3/2 'valid' max-pool after
# it needs 3 of them, so the network needs a level side of at least 5 px; smaller levels are
# skipped. (The slim backbone pads everything and runs on any size: network.min_input_side.)
MIN_LEVEL_SIDE = 5


class PyramidLevel(NamedTuple):
    scale: float  # nominal pyramid scale, e.g. 0.7071
    scale_yx: tuple[float, float]  # actual factors level_size / original_image_size (y, x)
    attention: np.ndarray  # (h, w) attention scores of this level
    features: np.ndarray  # (D, h, w) local descriptors of this level (channel first): block3, or DELG's code
    global_descriptor: np.ndarray | None = None  # (G,) raw global descriptor of this level (DELG), else None
    # tf_legacy: size of the image the levels were resized from / original size (y, x), TF's
    # scale_factors; (1, 1) when that image is the original (always so for pillow)
    resize_yx: tuple[float, float] = (1.0, 1.0)


class LevelInput(NamedTuple):
    scale: float
    scale_yx: tuple[float, float]
    image: np.ndarray  # (1, 3, h, w) float32, the network's input
    resize_yx: tuple[float, float] = (1.0, 1.0)


class PyramidPlan(NamedTuple):
    """How one image becomes a pyramid (src/extraction/geometry.py gives the rules)."""

    base_size: tuple[int, int]  # (h, w) of the image the levels are resized from
    resize_yx: tuple[float, float]  # base_size / original size; (1, 1) when the base is the original
    levels: list[tuple[float, int, int]]  # (scale, level h, level w) of every usable level, config order


def normalize_images(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1], the network's input convention."""
    images = np.asarray(images_uint8, dtype=np.float32)
    return np.ascontiguousarray(((images - 128.0) / 128.0).transpose(0, 3, 1, 2))


def normalize_image_hwc(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 HWC in [-1, 1], computed in float32 as TF's graph does."""
    return (np.asarray(image_uint8, dtype=np.float32) - np.float32(128.0)) / np.float32(128.0)


def _legacy_sampling(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (lower, upper) and weights of TF's legacy bilinear sampling along one axis.

    Output pixel i samples input coordinate i * (in / out) (no half-pixel offset), all in float32
    as TF computes it; upper is clamped to the last row.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source)
    lerp = (source - lower).astype(np.float32)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return np.maximum(lower.astype(np.int64), 0), upper, lerp


def tf_legacy_resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) of a float HWC
    image, in NumPy float32 with TF's order of operations (top, bottom, then between them)."""
    image = np.asarray(image, dtype=np.float32)
    y0, y1, y_lerp = _legacy_sampling(image.shape[0], height)
    x0, x1, x_lerp = _legacy_sampling(image.shape[1], width)
    top_rows, bottom_rows = image[y0], image[y1]
    x_lerp = x_lerp[None, :, None]
    top = top_rows[:, x0] + (top_rows[:, x1] - top_rows[:, x0]) * x_lerp
    bottom = bottom_rows[:, x0] + (bottom_rows[:, x1] - bottom_rows[:, x0]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None, None]


def _fit_factor(height: int, width: int, config: ExtractionConfig) -> tuple[float, float]:
    """(factor before the pyramid, factor before the memory bound) of an image of (height, width)."""
    factor = 1.0
    largest = max(height, width)
    if 0 < config.max_image_size < largest:
        factor = config.max_image_size / largest
    elif 0 < largest < config.min_image_size:
        factor = config.min_image_size / largest
    unbounded = factor
    level_pixels = height * width * (factor * max(config.image_scales)) ** 2
    if 0 < config.max_pixels_per_scale < level_pixels:
        factor *= (config.max_pixels_per_scale / level_pixels) ** 0.5
    return factor, unbounded


def fit_image_size(height: int, width: int, config: ExtractionConfig, name: str = "") -> float:
    """Factor applied before the pyramid: max/min_image_size, then the per-level memory bound.

    max_pixels_per_scale bounds the largest level, and so the network's memory: the default
    (3.5 M pixels) keeps extraction of any image near 2.7 GB in PyNative mode (docs/troubleshooting.md);
    -1: no bound.
    """
    factor, unbounded = _fit_factor(height, width, config)
    if factor < unbounded:
        LOGGER.warning("%s: %dx%d is too large for pyramid scale %g (more than %d pixels); "
                       "downscaled by %.3f", name or "image", width, height, max(config.image_scales),
                       config.max_pixels_per_scale, factor)
    return factor


def needed_image_size(height: int, width: int, config: ExtractionConfig) -> tuple[int, int]:
    """The largest level's (h, w) for an image of (height, width): all the pyramid needs to decode.

    tf_legacy needs the full image: TF's extractor resizes the fully decoded image, and a JPEG
    decoded reduced (DCT scaling) has other pixels.
    """
    factor = _fit_factor(height, width, config)[0] * max(config.image_scales)
    if factor >= 1.0 or config.resize == "tf_legacy":
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


def read_for_pyramid(path: str | Path, config: ExtractionConfig, crop: Sequence[float] | None = None
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file (or its [x1, y1, x2, y2] `crop`) as uint8 RGB, and the (h, w) its levels refer to.

    Memory stays bounded for any image: a large JPEG is decoded only as large as the top pyramid
    level needs (then the array is smaller than the returned size).
    """
    if crop is None:
        return read_image(path, functools.partial(needed_image_size, config=config))
    image = crop_to_box(load_image(path), crop)
    return image, image.shape[:2]


def pyramid_plan(height: int, width: int, config: ExtractionConfig, name: str = "",
                 min_side: int = MIN_LEVEL_SIDE) -> PyramidPlan:
    """The base image and the levels of an image of (height, width): levels whose sides are at least
    `min_side` (network.min_input_side of the backbone), in config order."""
    if config.resize == "tf_legacy":  # TF resizes the image first and checks its minimum side after
        base_h, base_w = geometry.resized_size(height, width, fit_image_size(height, width, config, name))
        level_factor = 1.0
    else:
        base_h, base_w = height, width
        level_factor = fit_image_size(height, width, config, name) if min(height, width) >= MIN_IMAGE_SIDE else 1.0
    resize_yx = (base_h / height, base_w / width) if height and width else (1.0, 1.0)  # (an empty crop)
    if min(base_h, base_w) < MIN_IMAGE_SIDE:
        LOGGER.warning("%s: %dx%d is under %d px; no features", name or "image", base_w, base_h, MIN_IMAGE_SIDE)
        return PyramidPlan((base_h, base_w), resize_yx, [])
    levels, skipped = [], []
    for scale in config.image_scales:
        level_h, level_w = geometry.level_size(base_h, base_w, scale, config.resize, level_factor)
        if min(level_h, level_w) < max(min_side, 1):
            skipped.append(scale)
        else:
            levels.append((scale, level_h, level_w))
    if skipped:
        LOGGER.warning("%s: %dx%d: pyramid scale(s) %s skipped (a level needs at least %d px a side)%s",
                       name or "image", width, height, ", ".join(f"{s:g}" for s in skipped), max(min_side, 1),
                       "" if levels else "; no features")
    return PyramidPlan((base_h, base_w), resize_yx, levels)


def level_sizes(height: int, width: int, config: ExtractionConfig, name: str = "",
                min_side: int = MIN_LEVEL_SIDE) -> list[tuple[float, int, int]]:
    """(scale, level height, level width) of every level the network can run on (pyramid_plan)."""
    return pyramid_plan(height, width, config, name, min_side).levels


def pyramid_inputs(image: np.ndarray, config: ExtractionConfig, name: str = "",
                   min_side: int = MIN_LEVEL_SIDE, full_size: tuple[int, int] | None = None) -> list[LevelInput]:
    """The network input of every usable pyramid level of a uint8 RGB image.

    `full_size` is the image's real (H, W) when `image` was decoded reduced (images.read_image):
    the levels and their scale_yx refer to the full size, so locations come out in its pixels.
    """
    height, width = full_size or image.shape[:2]
    plan = pyramid_plan(height, width, config, name, min_side)
    if not plan.levels:
        return []
    if config.resize == "tf_legacy":
        normalized = normalize_image_hwc(resize_image(image, *plan.base_size))
        return [
            LevelInput(scale, (level_h / height, level_w / width),
                       np.ascontiguousarray(tf_legacy_resize_bilinear(normalized, level_h, level_w)
                                            .transpose(2, 0, 1)[None]), resize_yx=plan.resize_yx)
            for scale, level_h, level_w in plan.levels
        ]
    return [
        LevelInput(scale, (level_h / height, level_w / width),
                   normalize_images(resize_image(image, level_h, level_w)[None]))
        for scale, level_h, level_w in plan.levels
    ]
