"""The image pyramid, in plain NumPy: which sizes each image is run at, and the network input of each level.

Shared by direct extraction and the Ascend-310 preprocess, so both feed the network the same
pixels. Levels are resized from the uint8 image with Pillow's bilinear filter at
round(H * factor * scale) x round(W * factor * scale), then normalised as (x - 128) / 128, NCHW.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from model_utils.config import ExtractionConfig
from src.extraction.images import resize_image

LOGGER = logging.getLogger("delf.extract")

MIN_IMAGE_SIDE = 10  # smaller images give no features (as the TF reference)
# conv1 (7x7/2, 'same') gives ceil(n / 2) rows and the 3x3/2 'valid' max-pool after it needs 3 of
# them, so the network needs a level side of at least 5 px; smaller levels are skipped.
MIN_LEVEL_SIDE = 5


class PyramidLevel(NamedTuple):
    scale: float  # nominal pyramid scale, e.g. 0.7071
    scale_yx: tuple[float, float]  # actual factors level_size / original_image_size (y, x)
    attention: np.ndarray  # (h, w) attention scores of this level
    features: np.ndarray  # (D, h, w) block3 features of this level (channel first)


class LevelInput(NamedTuple):
    scale: float
    scale_yx: tuple[float, float]
    image: np.ndarray  # (1, 3, h, w) float32, the network's input


def normalize_images(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1], the network's input convention."""
    images = np.asarray(images_uint8, dtype=np.float32)
    return np.ascontiguousarray(((images - 128.0) / 128.0).transpose(0, 3, 1, 2))


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
    if level_pixels > config.max_pixels_per_scale:
        factor *= (config.max_pixels_per_scale / level_pixels) ** 0.5
    return factor, unbounded


def fit_image_size(height: int, width: int, config: ExtractionConfig, name: str = "") -> float:
    """Factor applied before the pyramid: max/min_image_size, then the per-level memory bound.

    max_pixels_per_scale bounds the largest level, and so the network's memory: the default
    (3.5 M pixels) keeps extraction of any image near 2.7 GB in PyNative mode (README).
    """
    factor, unbounded = _fit_factor(height, width, config)
    if factor < unbounded:
        LOGGER.warning("%s: %dx%d is too large for pyramid scale %g (more than %d pixels); "
                       "downscaled by %.3f", name or "image", width, height, max(config.image_scales),
                       config.max_pixels_per_scale, factor)
    return factor


def needed_image_size(height: int, width: int, config: ExtractionConfig) -> tuple[int, int]:
    """The largest level's (h, w) for an image of (height, width): all the pyramid needs to decode."""
    factor = _fit_factor(height, width, config)[0] * max(config.image_scales)
    if factor >= 1.0:
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


def level_sizes(height: int, width: int, config: ExtractionConfig, name: str = "") -> list[tuple[float, int, int]]:
    """(scale, level height, level width) of every level the network can run on, in config order."""
    if min(height, width) < MIN_IMAGE_SIDE:
        LOGGER.warning("%s: %dx%d is under %d px; no features", name or "image", width, height, MIN_IMAGE_SIDE)
        return []
    factor = fit_image_size(height, width, config, name)
    sizes, skipped = [], []
    for scale in config.image_scales:
        level_h, level_w = round(height * factor * scale), round(width * factor * scale)
        if min(level_h, level_w) < MIN_LEVEL_SIDE:
            skipped.append(scale)
        else:
            sizes.append((scale, level_h, level_w))
    if skipped:
        LOGGER.warning("%s: %dx%d: pyramid scale(s) %s skipped (a level needs at least %d px a side)%s",
                       name or "image", width, height, ", ".join(f"{s:g}" for s in skipped), MIN_LEVEL_SIDE,
                       "" if sizes else "; no features")
    return sizes


def pyramid_inputs(image: np.ndarray, config: ExtractionConfig, name: str = "",
                   full_size: tuple[int, int] | None = None) -> list[LevelInput]:
    """The network input of every usable pyramid level of a uint8 RGB image.

    `full_size` is the image's real (H, W) when `image` was decoded reduced (images.read_image):
    the levels and their scale_yx refer to the full size, so locations come out in its pixels.
    """
    height, width = full_size or image.shape[:2]
    return [
        LevelInput(scale, (level_h / height, level_w / width),
                   normalize_images(resize_image(image, level_h, level_w)[None]))
        for scale, level_h, level_w in level_sizes(height, width, config, name)
    ]
