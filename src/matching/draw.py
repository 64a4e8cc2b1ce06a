"""Drawing a verified image pair: both images side by side with a line per inlier (eval_match.png)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.matching.verify import MatchResult


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]  # an alpha channel is dropped
    raise InputError(f"expected an (H, W) or (H, W, 3|4) image array, got shape {image.shape}")


def side_by_side(image_1: np.ndarray, image_2: np.ndarray, pad_value: int = 255) -> np.ndarray:
    """Both images on one RGB canvas, image 2 right of image 1, the shorter one padded below."""
    rgb_1, rgb_2 = (_as_rgb(image) for image in (image_1, image_2))
    height = max(rgb_1.shape[0], rgb_2.shape[0])
    canvas = np.full((height, rgb_1.shape[1] + rgb_2.shape[1], 3), pad_value, dtype=np.uint8)
    canvas[: rgb_1.shape[0], : rgb_1.shape[1]] = rgb_1
    canvas[: rgb_2.shape[0], rgb_1.shape[1] :] = rgb_2
    return canvas


def draw_matches(
    image_1: np.ndarray,
    image_2: np.ndarray,
    result: MatchResult,
    output_path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Save a PNG, exactly the size of the two images side by side, with a line per inlier."""
    canvas = side_by_side(image_1, image_2)
    height, width = canvas.shape[:2]
    offset_x = np.asarray(image_1).shape[1]
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(canvas, interpolation="nearest")
    if result.num_inliers:
        # (y, x) -> (x, y), image-2 points shifted right by image 1's width.
        start = result.inliers_1[:, ::-1]
        end = result.inliers_2[:, ::-1] + np.array([offset_x, 0.0])
        axes.add_collection(LineCollection(np.stack([start, end], axis=1), colors="cyan", linewidths=1))
        points = np.concatenate([start, end])
        axes.scatter(points[:, 0], points[:, 1], s=6, c="yellow", edgecolors="none")
    if title:
        axes.text(8, 8, title, va="top", ha="left", fontsize=12, bbox={"facecolor": "white", "alpha": 0.8})
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output_path) as temporary, open(temporary, "wb") as stream:
        figure.savefig(stream, format="png", dpi=dpi)
    return output_path
