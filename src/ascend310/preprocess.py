"""Ascend-310 path, step 1: images -> input files of the exported DELF network (src/ascend310/protocol.py).

The levels are those of direct extraction (src/extraction/pyramid.pyramid_inputs: same sizes,
resizing and normalisation). Input modes (docs/export-310.md, "Input shapes"):

- exact:  each level at its own size, for the dynamic-H/W MindIR (export.py's default). The
  features equal direct extraction.
- canvas: each level zero-padded (0 = grey 128 after normalisation, the value the network's own
  'same' padding uses) bottom/right onto a square canvas per scale, whose side follows from
  `extraction.max_image_size` (`canvas_sides`), for devices that need static shapes. Only cells
  whose receptive field (291 px) reaches the padding differ from direct extraction.

An image that cannot be read or prepared is recorded in the manifest with its error (postprocess
reports it) and does not stop the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import atomic_write_bytes, list_images
from src.ascend310.protocol import (
    INPUTS_DIR,
    OUTPUTS_DIR,
    clear_work_dir,
    input_name,
    write_manifest,
)
from src.extraction import geometry, sharding
from src.extraction.images import failure_reason
from src.extraction.pyramid import pyramid_inputs, read_for_pyramid

LOGGER = logging.getLogger("delf.preprocess")

INPUT_MODES = ("exact", "canvas")
DEFAULT_STORE = "features.h5"


class Job(NamedTuple):
    store: str  # feature store file name the features go to, e.g. "features.h5"
    image_id: str
    path: Path
    crop: tuple[float, float, float, float] | None  # [x1, y1, x2, y2] (retrieval queries)


def canvas_side(max_image_size: int, scale: float, resize: str = "pillow") -> int:
    """Side of the square canvas that holds every level of `scale` plus the odd-size offset.

    Images are fitted into max_image_size, so a level side is at most round(max_image_size * scale)
    (by the level-size rule of `resize`, geometry.level_size); the canvas is that bound made even
    (see place_on_canvas).
    """
    bound = math.floor(max_image_size * scale + 0.5 + 1e-6)
    if resize == "tf_legacy":  # the float32 product can round the other way
        bound = max(bound, geometry.level_size(max_image_size, max_image_size, scale, resize)[0])
    return bound + bound % 2


def canvas_sides(config: ExtractionConfig) -> tuple[int, ...]:
    """Canvas side of each pyramid scale (config.image_scales order) for static input shapes."""
    if config.max_image_size <= 0:
        raise InputError(
            "extraction.max_image_size must be positive for static input shapes (it sizes the canvas of "
            f"every pyramid scale), got {config.max_image_size}: pass e.g. --extraction.max_image_size=1024"
        )
    return tuple(canvas_side(config.max_image_size, scale, config.resize) for scale in config.image_scales)


def place_on_canvas(level_input: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad a (1, 3, h, w) level bottom/right to (1, 3, side, side); returns (canvas, (dy, dx)).

    conv1 (7x7, stride 2, 'same') pads 3 rows above an odd-sized input but 2 above an even one
    (the canvas is even). Odd sides are therefore shifted by one pixel, whose zero matches that
    padding: conv1 then samples the same pixels, and every map stays aligned at its top-left.
    """
    if side % 2:
        raise ValueError(f"canvas sides are even (see canvas_side), got {side}")
    _, channels, height, width = level_input.shape
    offset = (height % 2, width % 2)
    if height + offset[0] > side or width + offset[1] > side:
        raise InputError(
            f"a {height}x{width} pyramid level does not fit the {side}x{side} canvas: images must fit "
            "extraction.max_image_size (is extraction.min_image_size larger than max_image_size?)"
        )
    canvas = np.zeros((1, channels, side, side), dtype=np.float32)
    canvas[:, :, offset[0]:offset[0] + height, offset[1]:offset[1] + width] = level_input
    return canvas, offset


def plan_jobs(images_path: str | Path, names: Sequence[str] | None = None,
              ground_truth: dict | None = None) -> list[Job]:
    """Images to prepare: all in the folder, the `names` among them, or a retrieval data set.

    With a loaded `ground_truth` the database images go to index_features.h5 and the queries,
    cropped to their bbx, to query_features.h5 (as src/build_feature_dataset.py); otherwise all go
    to features.h5.
    """
    if ground_truth is not None:
        return [Job(store.name, image_id, path, crop)
                for store, image_id, path, crop in sharding.plan_jobs(images_path, ground_truth, Path())]
    return [Job(DEFAULT_STORE, image_id, path, None) for image_id, path in list_images(images_path, names).items()]


def prepare_image(job: Job, number: int, config: ExtractionConfig, inputs_dir: Path,
                  sides: dict[float, int]) -> dict:
    """Write the level files of one image; returns its manifest entry (without store/id/path)."""
    image, image_size = read_for_pyramid(job.path, config, job.crop)
    inputs = pyramid_inputs(image, config, str(job.path), full_size=image_size)
    del image  # can be far larger than every level
    levels = []
    for index, level in enumerate(inputs):
        array = level.image
        size = list(array.shape[2:])
        if sides:
            array = place_on_canvas(array, sides[level.scale])[0]
        file_name = input_name(number, index, array.shape[2], array.shape[3])
        atomic_write_bytes(inputs_dir / file_name, np.ascontiguousarray(array, dtype=np.float32).tobytes())
        levels.append({"input_file": file_name, "scale": level.scale, "scale_yx": list(level.scale_yx),
                       "resize_yx": list(level.resize_yx), "size": size})
    return {"image_size": list(image_size), "levels": levels}


def preprocess(jobs: Sequence[Job], config: ExtractionConfig, work_dir: str | Path, input_mode: str = "exact",
               progress: bool = True) -> list[dict]:
    """Replace the run in `work_dir` by the input files and manifest of `jobs`; returns the manifest's images."""
    if input_mode not in INPUT_MODES:
        raise InputError(f"input_mode must be one of {', '.join(INPUT_MODES)}, got {input_mode!r}")
    sides = dict(zip(config.image_scales, canvas_sides(config), strict=True)) if input_mode == "canvas" else {}
    work_dir = Path(work_dir)
    for folder in (work_dir / INPUTS_DIR, work_dir / OUTPUTS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    clear_work_dir(work_dir)  # outputs of an earlier run must not pass for this one's
    images = []
    for number, job in enumerate(tqdm(jobs, desc="preprocess", unit="image", disable=not progress)):
        entry = {"image_id": job.image_id, "store": job.store, "path": str(job.path)}
        try:
            entry.update(prepare_image(job, number, config, work_dir / INPUTS_DIR, sides))
        except (InputError, MemoryError, ValueError) as error:
            # One bad image must not end a long run: postprocess reports it as failed.
            entry["error"] = failure_reason(job.path, error)
            LOGGER.error("%s failed: %s", job.image_id, entry["error"])
        images.append(entry)
    write_manifest(work_dir, input_mode, images)
    return images
