"""Keypoint selection and descriptor post-processing on plain arrays.

Shared by direct extraction (src/extract_feature.py) and the Ascend-310 postprocess, which both
hand over per-level attention and block3 feature maps. The steps follow TF DELF:
attention >= score_threshold per level -> receptive-box centres mapped back to the original image
-> NMS over all levels by attention (top-k when iou_threshold is 1.0) -> L2 -> PCA -> L2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from src.box_list_np import BoxList
from src.box_list_ops_np import box_centers, non_max_suppression, receptive_boxes
from src.datum_io import read_datum
from src.delf_config import ExtractionConfig
from src.errors import InputError


class PyramidLevel(NamedTuple):
    scale: float  # nominal pyramid scale, e.g. 0.7071
    scale_yx: tuple[float, float]  # actual factors level_size / original_image_size (y, x)
    attention: np.ndarray  # (h, w) attention scores of this level
    features: np.ndarray  # (D, h, w) block3 features of this level (channel first)


class PcaParameters(NamedTuple):
    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, D), rows are principal components (descending variance)
    variances: np.ndarray | None  # (D,)


def _level_candidates(level: PyramidLevel, index: int, config: ExtractionConfig) -> BoxList:
    """Boxes (original-image pixels) of one level's cells above the threshold, with their fields."""
    attention = np.asarray(level.attention)
    features = np.asarray(level.features)
    if attention.ndim != 2 or features.ndim != 3 or features.shape[1:] != attention.shape:
        raise InputError(
            f"pyramid level {index} (scale {level.scale}): attention {attention.shape} and features "
            f"{features.shape} do not match (need (h, w) and (D, h, w))"
        )
    scale_y, scale_x = (float(s) for s in level.scale_yx)
    if not (scale_y > 0 and scale_x > 0 and level.scale > 0):
        raise InputError(
            f"pyramid level {index}: scales must be positive, got {level.scale} and {level.scale_yx}"
        )
    if np.isnan(attention).any():
        raise InputError(f"pyramid level {index} (scale {level.scale}): attention map contains NaN")

    selected = np.flatnonzero(attention.ravel() >= config.score_threshold)
    boxes = receptive_boxes(*attention.shape, config.receptive_field, config.stride, config.padding)
    candidates = BoxList(boxes[selected] / np.array([scale_y, scale_x, scale_y, scale_x]))
    candidates.add_field("scores", attention.ravel()[selected])
    candidates.add_field("descriptors", features.reshape(features.shape[0], -1)[:, selected].T)
    candidates.add_field("scales", np.full(selected.size, 1.0 / level.scale))
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
    for name in ("scores", "scales", "descriptors"):
        merged.add_field(name, np.concatenate([c.get_field(name) for c in per_level]))

    keep = non_max_suppression(
        merged.boxes,
        merged.get_field("scores"),
        config.iou_threshold,
        min(config.max_feature_num, len(merged)),
    )
    kept = merged.gather(keep)
    return (
        box_centers(kept.boxes).astype(np.float32),
        kept.get_field("descriptors").astype(np.float32),
        kept.get_field("scales").astype(np.float32),
        kept.get_field("scores").astype(np.float32),
    )


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; like tf.nn.l2_normalize, all-zero rows stay zero (no NaN)."""
    squared = np.sum(rows * rows, axis=1, keepdims=True)
    return rows / np.sqrt(np.maximum(squared, 1e-12))


_PCA_HELP = "run scripts/download_pretrained.sh, or learn PCA on your own features with src/fit_pca.py"


def _load_array(path: str, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise InputError(f"PCA {what} file {path} not found: {_PCA_HELP}")
    if path.endswith(".datum"):
        # The TF release ships its PCA as .datum; read it directly rather than make users convert.
        return read_datum(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"PCA {what} file {path} cannot be read as a .npy array: {error}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"PCA {what} file {path} holds several arrays (.npz); need a single .npy array")
    return array


def load_pca(config: ExtractionConfig) -> PcaParameters:
    """Load and shape-check the PCA files named in `config` (.npy, or TF .datum)."""
    depth, dim = config.feature_depth, config.pca_dim
    mean = _load_array(config.pca_mean_path, "mean")
    projection = _load_array(config.pca_projection_path, "projection")
    if mean.shape != (depth,):
        raise InputError(
            f"PCA mean file {config.pca_mean_path} has shape {mean.shape}, expected ({depth},) "
            f"(feature_depth {depth})"
        )
    # Only the first pca_dim rows are used, so a truncated (pca_dim, D) projection is fine too.
    if projection.ndim != 2 or projection.shape[1] != depth or not dim <= projection.shape[0] <= depth:
        raise InputError(
            f"PCA projection file {config.pca_projection_path} has shape {projection.shape}, expected "
            f"({depth}, {depth}) (feature_depth {depth}, at least pca_dim {dim} rows)"
        )
    variances = None
    if config.use_whitening:
        variances = _load_array(config.pca_variances_path, "variances")
        if variances.ndim != 1 or not dim <= variances.shape[0] <= depth:
            raise InputError(
                f"PCA variances file {config.pca_variances_path} has shape {variances.shape}, "
                f"expected ({depth},) (at least pca_dim {dim} values)"
            )
        if not np.all(variances[:dim] > 0):
            raise InputError(
                f"PCA variances file {config.pca_variances_path}: the first {dim} variances must be "
                "positive for whitening"
            )
        variances = variances.astype(np.float64)
    return PcaParameters(mean.astype(np.float64), projection.astype(np.float64), variances)


def postprocess_descriptors(
    descriptors: np.ndarray, pca: PcaParameters | None, pca_dim: int, use_whitening: bool
) -> np.ndarray:
    """L2-normalise raw descriptors, optionally PCA-project (and whiten) to pca_dim, L2 again.

    Returns float32 (N, pca_dim) with PCA, else (N, D).
    """
    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2:
        raise InputError(f"descriptors must be a (N, D) array, got shape {descriptors.shape}")
    if pca is None:
        return l2_normalize(descriptors).astype(np.float32)
    depth = pca.mean.shape[0]
    if descriptors.shape[1] != depth:
        raise InputError(f"descriptors are {descriptors.shape[1]}-D but the PCA mean is {depth}-D")
    if not 0 < pca_dim <= pca.projection.shape[0]:
        raise InputError(f"pca_dim {pca_dim} must be in 1..{pca.projection.shape[0]} (PCA projection rows)")
    if descriptors.shape[0] == 0:
        return np.zeros((0, pca_dim), dtype=np.float32)
    projected = (l2_normalize(descriptors) - pca.mean) @ pca.projection[:pca_dim].T
    if use_whitening:
        if pca.variances is None:
            raise InputError("use_whitening is set but no PCA variances were loaded (pca_variances_path)")
        projected = projected / np.sqrt(pca.variances[:pca_dim])
    return l2_normalize(projected).astype(np.float32)
