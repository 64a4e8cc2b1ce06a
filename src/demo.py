"""The one-command demo: DELF-match a photo against a synthetic viewpoint change of itself.

The photo ships with scikit-image (no download). The second view is the photo rotated, zoomed,
shifted and brightened by a known affine transform; the demo extracts features of both, matches
them (KD-tree + RANSAC), writes eval_match.png and prints the recovered transform beside the true
one. Without a trained checkpoint the network runs on seeded random weights, and says so.

    python -m src.demo [--ckpt_path delf.ckpt] [--output_image eval_match.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data

if __package__ in (None, ""):  # run as `python src/demo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.device import setup_device  # noqa: E402
from model_utils.files import require_writable  # noqa: E402
from src.extraction.extractor import DelfExtractor  # noqa: E402
from src.extraction.images import resize_image  # noqa: E402
from src.extraction.pca import load_pca  # noqa: E402
from src.matching.draw import draw_matches  # noqa: E402
from src.matching.verify import match_features  # noqa: E402
from src.model.weights import build_extraction_model  # noqa: E402


def demo_photo() -> np.ndarray:
    """A real photo bundled with scikit-image: a Saturn V rocket on display (427 x 640, RGB)."""
    return skimage.data.rocket()


def viewpoint_change(image: np.ndarray, angle_degrees: float = 8.0, zoom: float = 1.3,
                     shift_xy: tuple[float, float] = (-40.0, 25.0), brightness: float = 1.15
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(warped image, 2x3 affine mapping original (x, y, 1) to warped (x, y)), same canvas size."""
    height, width = image.shape[:2]
    transform = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_degrees, zoom)
    transform[:, 2] += shift_xy
    warped = cv2.warpAffine(image, transform, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    return _brighten(warped, brightness), transform


def grid_aligned_change(image: np.ndarray, crop_yx: tuple[int, int] = (64, 128), brightness: float = 1.15
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A crop, zoomed out by exactly one pyramid octave, brightened: the change untrained weights handle.

    Random weights give descriptors that only survive what every CNN is equivariant to: shifts by
    multiples of the stride (crop offsets of 64 px become 32 px after the 2x zoom-out) and the
    pyramid's own octave resize.
    """
    top, left = crop_yx
    crop = image[top:, left:]
    half = resize_image(crop, int(round(crop.shape[0] / 2)), int(round(crop.shape[1] / 2)))
    transform = np.array([[0.5, 0.0, -0.5 * left], [0.0, 0.5, -0.5 * top]])
    return _brighten(half, brightness), transform


def _brighten(image: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def corner_error(estimated: np.ndarray, true: np.ndarray, height: int, width: int) -> float:
    """Mean distance (px) between where the two transforms send the image corners."""
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], dtype=np.float64)
    return float(np.linalg.norm(corners @ estimated.T - corners @ true.T, axis=1).mean())


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="", help="trained DELF checkpoint (default: untrained weights)")
    parser.add_argument("--output_image", default="eval_match.png", help="figure to write")
    config, args = get_config_and_args(argv, parser)
    require_writable(args.output_image, "output image")
    settings = config.extraction
    # Two images, 14 distinct shapes: PyNative beats compiling a graph per shape.
    target = setup_device(config.device_target, config.device_id, graph_mode=False)
    if not args.ckpt_path:
        print("NOTE: no trained DELF checkpoint given (--ckpt_path): the network runs on UNTRAINED, seeded "
              "random weights.\n      Matching still works for this synthetic view, but attention and "
              "descriptors are not DELF's; keeping the top features by attention (score_threshold 0).")
        settings = dataclasses.replace(settings, score_threshold=0.0)
    pca = None
    if settings.use_pca:
        if Path(settings.pca_mean_path).is_file():
            pca = load_pca(settings)
        else:
            print(f"NOTE: no PCA files ({settings.pca_mean_path}); using raw 1024-D descriptors "
                  "(scripts/download_pretrained.sh fetches the official PCA)")
    extractor = DelfExtractor(build_extraction_model(config, args.ckpt_path), settings, pca)

    photo = demo_photo()
    if args.ckpt_path:
        print("synthetic view: rotation 8 deg, zoom 1.3, shift, brightness x1.15")
        warped, true_transform = viewpoint_change(photo)
    else:
        print("synthetic view: crop, zoom-out x0.5, brightness x1.15 (stride-aligned: what random weights can match)")
        warped, true_transform = grid_aligned_change(photo)
    started = time.perf_counter()
    features = [extractor(image, name) for image, name in ((photo, "rocket"), (warped, "rocket (new view)"))]
    extract_seconds = time.perf_counter() - started
    result = match_features(*features, **dataclasses.asdict(config.matching), seed=config.seed)
    title = f"DELF demo: {result.num_inliers} inliers ({'trained' if args.ckpt_path else 'untrained'} weights)"
    draw_matches(photo, warped, result, args.output_image, title=title)

    print(f"features: {len(features[0].locations)} and {len(features[1].locations)} "
          f"({len(settings.image_scales)} scales, {extract_seconds:.1f} s on {target})")
    print(f"putative matches: {result.num_putative}, RANSAC inliers: {result.num_inliers}")
    np.set_printoptions(precision=3, suppress=True)
    print(f"true transform (x, y, 1) -> (x, y):\n{true_transform}")
    if result.transform is None:
        print("recovered transform: none (too few matches)")
    else:
        print(f"recovered transform:\n{result.transform}")
        error = corner_error(result.transform, true_transform, *photo.shape[:2])
        print(f"mean corner error: {error:.1f} px")
    print(f"wrote {args.output_image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
