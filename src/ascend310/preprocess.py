"""Ascend-310 path, step 1: images -> input files of the exported DELF network.

The pyramid is `DelfExtractor.pyramid`'s own (same level sizes, resizing and normalisation): the
network is swapped for a recorder that keeps each level's input. Every level becomes a raw float32
NCHW file `<job>_l<level>_<H>x<W>.bin` in `<work>/inputs`, and every image a manifest
`<work>/manifests/<job>.json` (image id, target feature store, image size, and per level: scale,
scale_yx, size, offset, input file) that src/postprocess.py turns back into pyramid levels.

Input modes (see the README's "Input shapes for Ascend 310"):

- exact:  each level at its own size, for the dynamic-H/W MindIR (export.py's default). The
  features equal direct extraction exactly.
- canvas: each level zero-padded (0 = grey 128 after normalisation, the value the network's own
  'same' padding uses) bottom/right onto a square canvas per scale, whose side follows from
  `extraction.max_image_size` (`canvas_sides`), for devices that need static shapes. Only cells
  whose receptive field (291 px) reaches the padding differ from direct extraction.

Throttling: the stages run concurrently (preprocess | runner | postprocess); at most `max_pending`
images are in flight (manifests not yet consumed by postprocess), so inputs and network outputs
cannot fill the disk. Use max_pending 0 when running the stages one after another.

    python -m src.preprocess --images_path DIR --output_path WORK [--input_mode canvas] \
        [--list_images_path list_images.txt | --gt_path GT] [--key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model_utils.cli import InputError, cli_main
from model_utils.config import ExtractionConfig
from model_utils.files import atomic_output, atomic_write_text, list_images, read_image_list, require_writable_dir
from src.extraction.images import crop_to_box, load_image, read_image
from src.extraction.pyramid import needed_image_size, pyramid_inputs

LOGGER = logging.getLogger("delf.preprocess")
FAILURES_FILE = "failures.txt"  # images that could not be read, 'id<TAB>reason' a line

INPUT_MODES = ("exact", "canvas")
INPUTS_DIR = "inputs"
OUTPUTS_DIR = "outputs"
MANIFESTS_DIR = "manifests"
# Written (empty) by preprocess into inputs/ and by the runner into outputs/ when they finish.
DONE_MARKER = "DONE"
MANIFEST_FORMAT = "delf-310-v1"
DEFAULT_STORE = "features.h5"
DEFAULT_MAX_PENDING = 8
DEFAULT_WAIT_TIMEOUT = 600.0
POLL_INTERVAL = 0.2


class Job(NamedTuple):
    store: str  # feature store file name the features go to, e.g. "features.h5"
    image_id: str
    path: Path
    crop: tuple[float, float, float, float] | None  # [x1, y1, x2, y2] (retrieval queries)


def canvas_side(max_image_size: int, scale: float) -> int:
    """Side of the square canvas that holds every level of `scale` plus the odd-size offset.

    Images are fitted into max_image_size, so a level side is at most round(max_image_size * scale);
    the canvas is that bound made even (see place_on_canvas).
    """
    bound = math.floor(max_image_size * scale + 0.5 + 1e-6)
    return bound + bound % 2


def canvas_sides(config: ExtractionConfig) -> tuple[int, ...]:
    """Canvas side of each pyramid scale (config.image_scales order) for static input shapes."""
    if config.max_image_size <= 0:
        raise InputError(
            "extraction.max_image_size must be positive for static input shapes (it sizes the canvas of "
            f"every pyramid scale), got {config.max_image_size}: pass e.g. --extraction.max_image_size=1024"
        )
    return tuple(canvas_side(config.max_image_size, scale) for scale in config.image_scales)


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


def plan_jobs(images_path: str | Path, list_images_path: str = "", gt_path: str = "") -> list[Job]:
    """Images to prepare: all in the folder, the two of a list file, or a retrieval data set.

    With `gt_path` the database images go to index_features.h5 and the queries, cropped to their
    bbx, to query_features.h5 (as src/build_feature_dataset.py); otherwise all go to features.h5.
    """
    if list_images_path and gt_path:
        raise InputError("give --list_images_path or --gt_path, not both")
    if gt_path:
        from src.evaluation.ground_truth import load_ground_truth
        from src.extraction.dataset import plan_jobs as plan_dataset_jobs

        ground_truth = load_ground_truth(gt_path, sorted(list_images(images_path)))
        return [Job(store.name, image_id, path, crop)
                for store, image_id, path, crop in plan_dataset_jobs(images_path, ground_truth, Path())]
    names = None
    if list_images_path:
        names = read_image_list(list_images_path)
    return [Job(DEFAULT_STORE, image_id, path, None) for image_id, path in list_images(images_path, names).items()]


def _write_bytes(path: Path, data: bytes | np.ndarray) -> None:
    """Atomic: readers (the runner, postprocess) never see a half-written file."""
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data.tobytes() if isinstance(data, np.ndarray) else data)


def _wait_for_room(manifests_dir: Path, max_pending: int, wait_timeout: float) -> None:
    if max_pending <= 0:
        return
    started = time.monotonic()
    while len(list(manifests_dir.glob("*.json"))) >= max_pending:
        if time.monotonic() - started > wait_timeout:
            raise InputError(
                f"{max_pending} images have waited more than {wait_timeout:g} s in {manifests_dir} for the runner "
                "and src.postprocess: are they running? (use --max_pending 0 to run the stages one after another)"
            )
        time.sleep(POLL_INTERVAL)


def _check_empty_work_dir(inputs_dir: Path, manifests_dir: Path) -> None:
    leftovers = list(inputs_dir.glob("*.bin")) + list(manifests_dir.glob("*.json"))
    if leftovers:
        raise InputError(
            f"{inputs_dir.parent} holds {len(leftovers)} files of an earlier run (e.g. {leftovers[0].name}): "
            "finish that run (runner + src.postprocess) or remove the directory"
        )


def preprocess(jobs: Sequence[Job], config: ExtractionConfig, work_dir: str | Path, input_mode: str = "exact",
               max_pending: int = DEFAULT_MAX_PENDING, wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
               progress: bool = True, failed: dict[str, str] | None = None) -> int:
    """Write the input files and manifests of `jobs` into `work_dir`; returns the number of level files.

    An image that cannot be read is logged, added to `failed` (image id -> "path: reason") and
    skipped: it gets no manifest, so postprocess never records it as done.
    """
    from tqdm import tqdm

    if input_mode not in INPUT_MODES:
        raise InputError(f"input_mode must be one of {', '.join(INPUT_MODES)}, got {input_mode!r}")
    sides = dict(zip(config.image_scales, canvas_sides(config), strict=True)) if input_mode == "canvas" else {}
    work_dir = Path(work_dir)
    inputs_dir, manifests_dir = work_dir / INPUTS_DIR, work_dir / MANIFESTS_DIR
    for directory in (inputs_dir, manifests_dir, work_dir / OUTPUTS_DIR):
        directory.mkdir(parents=True, exist_ok=True)
    _check_empty_work_dir(inputs_dir, manifests_dir)
    (inputs_dir / DONE_MARKER).unlink(missing_ok=True)
    (work_dir / OUTPUTS_DIR / DONE_MARKER).unlink(missing_ok=True)

    num_files = 0
    for number, job in enumerate(tqdm(jobs, desc="preprocess", unit="image", disable=not progress)):
        _wait_for_room(manifests_dir, max_pending, wait_timeout)
        try:
            if job.crop is None:  # a large JPEG is decoded only as large as the top level needs
                image, image_size = read_image(job.path, functools.partial(needed_image_size, config=config))
            else:
                image = crop_to_box(load_image(job.path), job.crop)
                image_size = image.shape[:2]
            inputs = pyramid_inputs(image, config, str(job.path), image_size)
        except (InputError, MemoryError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            LOGGER.error("%s failed: %s", job.image_id, reason)
            if failed is not None:
                failed[job.image_id] = reason if str(job.path) in reason else f"{job.path}: {reason}"
            continue
        del image
        levels = []
        for index, level in enumerate(inputs):
            array = level.image
            size, offset = list(array.shape[2:]), (0, 0)
            if sides:
                array, offset = place_on_canvas(array, sides[level.scale])
            file_name = f"{number:06d}_l{index}_{array.shape[2]}x{array.shape[3]}.bin"
            _write_bytes(inputs_dir / file_name, np.ascontiguousarray(array, dtype=np.float32))
            levels.append({"input_file": file_name, "scale": level.scale, "scale_yx": list(level.scale_yx),
                           "size": size, "offset": list(offset),
                           "shape": list(array.shape)})
            num_files += 1
        manifest = {"format": MANIFEST_FORMAT, "image_id": job.image_id, "store": job.store,
                    "image_size": list(image_size), "input_mode": input_mode, "levels": levels}
        # The manifest comes last: postprocess only looks for outputs of complete images.
        _write_bytes(manifests_dir / f"{number:06d}.json", json.dumps(manifest, indent=1).encode())
    _write_bytes(inputs_dir / DONE_MARKER, b"")
    return num_files


@cli_main
def main(argv: list[str] | None = None) -> int:
    from model_utils.config import get_config_and_args

    parser = argparse.ArgumentParser(description="Write DELF pyramid inputs (raw float32 + JSON manifests) "
                                     "for the exported network (Ascend 310 runner or src.infer_mindir).")
    parser.add_argument("--images_path", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output_path", required=True, help="work directory (inputs/, manifests/, outputs/)")
    parser.add_argument("--list_images_path", default="", help="only the two images named in this file")
    parser.add_argument("--gt_path", default="", help="retrieval ground truth: database images + cropped queries")
    parser.add_argument("--input_mode", choices=INPUT_MODES, default="exact",
                        help="exact: each level at its size (dynamic MindIR); canvas: padded to static "
                        "per-scale canvases sized by extraction.max_image_size")
    parser.add_argument("--max_pending", type=int, default=DEFAULT_MAX_PENDING,
                        help="images in flight before waiting for the runner and postprocess (0: no limit)")
    parser.add_argument("--wait_timeout", type=float, default=DEFAULT_WAIT_TIMEOUT,
                        help="seconds to wait for room before giving up")
    config, args = get_config_and_args(argv, parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    require_writable_dir(args.output_path, "work folder")
    jobs = plan_jobs(args.images_path, args.list_images_path, args.gt_path)
    failed: dict[str, str] = {}
    count = preprocess(jobs, config.extraction, args.output_path, args.input_mode, args.max_pending,
                       args.wait_timeout, failed=failed)
    print(f"{len(jobs) - len(failed)} images -> {count} level files in {Path(args.output_path) / INPUTS_DIR}")
    failures = Path(args.output_path) / FAILURES_FILE
    if not failed:
        failures.unlink(missing_ok=True)
        return 0
    atomic_write_text(failures, "".join(f"{image_id}\t{reason}\n" for image_id, reason in sorted(failed.items())))
    print(f"{len(failed)} image(s) failed (listed in {failures}):", file=sys.stderr)
    for reason in failed.values():
        print(f"  {reason}", file=sys.stderr)
    return 0 if config.skip_bad_images else 1


if __name__ == "__main__":
    sys.exit(main())
