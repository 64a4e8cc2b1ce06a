"""DELF keypoint selection on plain arrays: receptive boxes, IoU, NMS, and selection over a pyramid.

Shared by direct extraction and the Ascend-310 postprocess, which both hand over per-level
attention and block3 feature maps. The steps follow TF DELF: attention >= score_threshold per
level -> receptive boxes mapped back to the image (src/extraction/geometry.py: the rule of
`extraction.resize`) -> NMS over all levels by attention (top-k when iou_threshold is 1.0) ->
box centres in original-image pixels.

Boxes are (N, 4) arrays in [ymin, xmin, ymax, xmax] order, as in TF's object_detection. Areas use
(ymax - ymin) * (xmax - xmin) (continuous coordinates, no +1), like its np_box_ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction import geometry
from src.extraction.pyramid import PyramidLevel


class BoxList:
    """(N, 4) boxes in [ymin, xmin, ymax, xmax] order with extra per-box arrays such as 'scores'."""

    def __init__(self, boxes: np.ndarray) -> None:
        boxes = np.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
        if not np.issubdtype(boxes.dtype, np.floating):
            boxes = boxes.astype(np.float64)
        self._boxes = boxes
        self._fields: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self._boxes.shape[0]

    @property
    def boxes(self) -> np.ndarray:
        """The (N, 4) box array."""
        return self._boxes

    def add_field(self, name: str, values: np.ndarray) -> None:
        """Attach one value (or row) per box under `name`."""
        values = np.asarray(values)
        if values.ndim == 0 or values.shape[0] != len(self):
            raise ValueError(f"field {name!r} needs {len(self)} entries, got shape {values.shape}")
        self._fields[name] = values

    def get_field(self, name: str) -> np.ndarray:
        if name not in self._fields:
            raise KeyError(f"box list has no field {name!r} (fields: {sorted(self._fields)})")
        return self._fields[name]

    def gather(self, indices: np.ndarray) -> BoxList:
        """A new BoxList with the boxes (and every field) at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        subset = BoxList(self._boxes[indices])
        for name, values in self._fields.items():
            subset.add_field(name, values[indices])
        return subset


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


def _level_candidates(level: PyramidLevel, index: int, config: ExtractionConfig) -> BoxList:
    """Boxes (geometry.map_cell_boxes) of one level's cells above the threshold, with their fields."""
    attention = np.asarray(level.attention)
    features = np.asarray(level.features)
    if attention.ndim != 2 or features.ndim != 3 or features.shape[1:] != attention.shape:
        raise InputError(
            f"pyramid level {index} (scale {level.scale}): attention {attention.shape} and features "
            f"{features.shape} do not match (need (h, w) and (D, h, w))"
        )
    scale_y, scale_x = (float(s) for s in level.scale_yx)
    if not (scale_y > 0 and scale_x > 0 and level.scale > 0 and all(v > 0 for v in level.resize_yx)):
        raise InputError(f"pyramid level {index}: scales must be positive, got {level.scale}, "
                         f"{level.scale_yx} and {level.resize_yx}")
    if np.isnan(attention).any():
        raise InputError(f"pyramid level {index} (scale {level.scale}): attention map contains NaN")

    selected = np.flatnonzero(attention.ravel() >= config.score_threshold)
    cells = receptive_boxes(*attention.shape, config.receptive_field, config.stride, config.padding)[selected]
    boxes, locations = geometry.map_cell_boxes(cells, level.scale, (scale_y, scale_x), level.resize_yx, config.resize)
    candidates = BoxList(boxes)
    candidates.add_field("locations", locations)
    candidates.add_field("scores", attention.ravel()[selected])
    candidates.add_field("descriptors", features.reshape(features.shape[0], -1)[:, selected].T)
    candidates.add_field("scales", geometry.feature_scales(level.scale, selected.size, config.resize))
    return candidates


def select_keypoints(
    levels: Sequence[PyramidLevel], config: ExtractionConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Select DELF keypoints over a pyramid.

    Returns (locations (N, 2) (y, x) in original-image pixels, raw descriptors (N, D),
    feature scales (N,) = 1 / pyramid scale, attention (N,)), all float32, best attention first.
    """
    if not levels:
        empty = np.zeros(0, dtype=np.float32)
        return empty.reshape(0, 2), np.zeros((0, config.feature_depth), np.float32), empty, empty
    depths = {np.shape(level.features)[0] for level in levels}
    if len(depths) != 1:
        raise InputError(f"pyramid levels have different feature depths: {sorted(depths)}")
    per_level = [_level_candidates(level, i, config) for i, level in enumerate(levels)]
    merged = BoxList(np.concatenate([c.boxes for c in per_level]))
    for name in ("locations", "scores", "scales", "descriptors"):
        merged.add_field(name, np.concatenate([c.get_field(name) for c in per_level]))

    keep = non_max_suppression(
        merged.boxes,
        merged.get_field("scores"),
        config.iou_threshold,
        min(config.max_feature_num, len(merged)),
    )
    kept = merged.gather(keep)
    return (
        kept.get_field("locations"),
        kept.get_field("descriptors").astype(np.float32),
        kept.get_field("scales"),
        kept.get_field("scores").astype(np.float32),
    )
