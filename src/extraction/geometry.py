"""Where pyramid levels sit in the image: their sizes, and where a cell's receptive box lies in the original.

The one place for this geometry, used by direct extraction, the Ascend-310 path and any other
extraction over the DELF pyramid. `extraction.resize` chooses one of two rules:

- pillow (this suite's models): max/min_image_size and the memory bound are folded into the level
  sizes, round(side * factor * scale) in float64, and every level is resized from the original
  image. A receptive box is divided by the level's actual factor (level side / image side), so a
  location is where the cell really lies, whatever rounding made the level's size.
- tf_legacy (imported TF DELF models): what TF1 DELF's extractor computes, to the bit
  (examples/extractor.py, feature_extractor.py). The uint8 image is first resized with Pillow to
  round(side * factor) when max/min_image_size (or the memory bound) asks for it; TF calls the
  ratio of that size to the original `scale_factors`, here `resize_yx`. Levels are
  tf.round(float32(side) * float32(scale)) of that image (round half to even); boxes are computed
  in float32, divided by the float32 *nominal* scale and their centres taken in float32; the
  centres are then divided by resize_yx. Feature scales are float32(1) / float32(scale).

The rules differ by up to ~0.5 / scale px in locations (2 px at scale 0.25, far from the origin),
by 1 px in a few level sides (e.g. 4662 at scale 0.7071) and by 1 ulp in some feature scales.
"""

from __future__ import annotations

import numpy as np


def resized_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) of an image resized by `factor` before the pyramid (TF's ResizeImage: Python round)."""
    if factor == 1.0:
        return height, width
    return int(round(height * factor)), int(round(width * factor))


def level_size(height: int, width: int, scale: float, rule: str, factor: float = 1.0) -> tuple[int, int]:
    """(h, w) of the pyramid level at `scale` of an image of (height, width).

    pillow: round(side * factor * scale) in float64. tf_legacy: the image is already resized
    (`factor` must be 1), tf.round(float32(side) * float32(scale)) with round half to even.
    """
    if rule == "tf_legacy":
        if factor != 1.0:
            raise ValueError("tf_legacy levels are sized from the resized image (factor 1)")
        sides = np.rint(np.array([height, width], dtype=np.float32) * np.float32(scale))
        return int(sides[0]), int(sides[1])
    return round(height * factor * scale), round(width * factor * scale)


def feature_scales(scale: float, count: int, rule: str) -> np.ndarray:
    """(count,) float32 feature scales 1 / scale of one level (tf_legacy: the float32 division)."""
    if rule == "tf_legacy":
        return np.full(count, np.float32(1.0) / np.float32(scale), dtype=np.float32)
    return np.full(count, 1.0 / scale).astype(np.float32)


def map_cell_boxes(cell_boxes: np.ndarray, scale: float, scale_yx: tuple[float, float],
                   resize_yx: tuple[float, float], rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, locations) of receptive boxes given in a level's pixels ([ymin, xmin, ymax, xmax]).

    `boxes` are what keypoint selection compares (NMS): original-image pixels (pillow, float64) or
    the pixels of the resized image the pyramid was built from (tf_legacy, float32, as TF). The
    (N, 2) float32 `locations` are box centres (y, x) in original-image pixels.
    `scale_yx` = level size / original size (pillow), `resize_yx` = resized / original size (tf_legacy).
    """
    if rule == "tf_legacy":
        # Integer-valued boxes below 2**24 are exact in float32: the cast loses nothing.
        boxes = np.asarray(cell_boxes, dtype=np.float32) / np.float32(scale)
        locations = box_centers(boxes) / np.asarray(resize_yx, dtype=np.float64)  # TF: float32 / float64 array
        return boxes, locations.astype(np.float32)
    scale_y, scale_x = scale_yx
    boxes = np.asarray(cell_boxes, dtype=np.float64) / np.array([scale_y, scale_x, scale_y, scale_x])
    return boxes, box_centers(boxes).astype(np.float32)


def box_centers(boxes: np.ndarray) -> np.ndarray:
    """(N, 2) centres (y, x) of [ymin, xmin, ymax, xmax] boxes, in the boxes' own dtype."""
    boxes = np.asarray(boxes)
    return (boxes[:, 0:2] + boxes[:, 2:4]) / boxes.dtype.type(2)
