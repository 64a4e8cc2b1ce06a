"""Vectorised box operations for DELF keypoint selection: receptive boxes, centres, IoU, NMS.

Boxes are (N, 4) arrays in [ymin, xmin, ymax, xmax] order, as in TF's object_detection. Areas use
(ymax - ymin) * (xmax - xmin) (continuous coordinates, no +1), like its np_box_ops.
"""

from __future__ import annotations

import numpy as np


def receptive_boxes(
    height: int, width: int, receptive_field: float, stride: float, padding: float
) -> np.ndarray:
    """Receptive-field boxes of every cell of a (height, width) feature map, row-major over (y, x).

    Cell (y, x) covers stride * [y, x, y, x] + [-padding, -padding, rf - 1 - padding, rf - 1 - padding]
    in the pixels of the image that was fed to the network (TF DELF's CalculateReceptiveBoxes).
    """
    if height < 0 or width < 0:
        raise ValueError(f"feature map size must be non-negative, got {height}x{width}")
    y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    corners = np.stack([y.ravel(), x.ravel(), y.ravel(), x.ravel()], axis=1)
    offset = np.array([-padding, -padding, receptive_field - 1 - padding, receptive_field - 1 - padding])
    return stride * corners + offset


def box_centers(boxes: np.ndarray) -> np.ndarray:
    """(N, 2) box centres in (y, x) order."""
    boxes = np.asarray(boxes)
    return (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0


def box_areas(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union; pairs whose union is empty (degenerate boxes) get 0."""
    boxes_a = np.asarray(boxes_a, dtype=np.float64)
    boxes_b = np.asarray(boxes_b, dtype=np.float64)
    top = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    left = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    bottom = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    right = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    intersection = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    union = box_areas(boxes_a)[:, None] + box_areas(boxes_b)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_output: int
) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, best score first, at most `max_output` of them.

    A box is dropped when its IoU with an already kept, higher-scored box exceeds `iou_threshold`
    (strictly, as in TF). Equal scores keep the lower index first. With iou_threshold >= 1.0 no box
    can be suppressed, so this is a plain top-k by score (a stable sort, no pairwise IoU).
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"need (N, 4) boxes and (N,) scores, got {boxes.shape} and {scores.shape}")
    if max_output < 0:
        raise ValueError(f"max_output must be non-negative, got {max_output}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    if iou_threshold >= 1.0:
        return order[:max_output]

    sorted_boxes = boxes[order]
    alive = np.ones(len(order), dtype=bool)
    kept: list[int] = []
    # One vectorised IoU row per kept box: at most max_output iterations, each O(N).
    while len(kept) < max_output:
        candidates = np.flatnonzero(alive)
        if candidates.size == 0:
            break
        best, rest = candidates[0], candidates[1:]
        kept.append(best)
        alive[best] = False
        overlaps = iou(sorted_boxes[best : best + 1], sorted_boxes[rest])[0]
        alive[rest[overlaps > iou_threshold]] = False
    return order[np.asarray(kept, dtype=np.int64)]
