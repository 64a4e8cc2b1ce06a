"""Match the DELF features of two images (nearest neighbours + affine RANSAC) and draw the inliers.

    python -m src.match_images --images_path DIR --features_path features.h5 \
        [--list_images_path list_images.txt | --image_1 A --image_2 B] [--output_image eval_match.png] \
        [--matching.engine=skimage ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python src/match_images.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import InputError, cli_main, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.files import find_image, image_id, read_image_list, require_writable  # noqa: E402
from src.extraction.images import load_image  # noqa: E402
from src.extraction.store_set import open_store  # noqa: E402
from src.matching.draw import draw_matches  # noqa: E402
from src.matching.verify import match_features  # noqa: E402

LOGGER = logging.getLogger("delf.match")


def read_image_pair_list(list_path: str | Path) -> tuple[str, str]:
    """The two image names in a list file (one a line; blank lines and '#' comments ignored)."""
    names = read_image_list(list_path)
    if len(names) != 2:
        raise InputError(f"{list_path}: expected exactly two image names (one a line), found {len(names)}"
                         + (f": {', '.join(names)}" if names else ""))
    return names[0], names[1]


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_path", required=True, help="directory holding the two images")
    parser.add_argument("--features_path", required=True, help="feature store (.h5) holding both images' features")
    parser.add_argument("--list_images_path", default=None, help="file with the two image names, one a line "
                        "(default list_images.txt; not with --image_1/2)")
    parser.add_argument("--image_1", help="first image name (without suffix)")
    parser.add_argument("--image_2", help="second image name (without suffix)")
    parser.add_argument("--output_image", default="eval_match.png", help="PNG to write")
    config, args = get_config_and_args(argv, parser)
    setup_logging(terminal_level=logging.INFO)
    if args.image_1 or args.image_2:
        if not (args.image_1 and args.image_2):
            raise InputError("give both --image_1 and --image_2 (or neither, to use --list_images_path)")
        if args.list_images_path:
            raise InputError("give either --list_images_path or --image_1/--image_2, not both")
        names = (args.image_1, args.image_2)
    else:
        names = read_image_pair_list(args.list_images_path or "list_images.txt")
    require_writable(args.output_image, "output image")
    image_paths = [find_image(args.images_path, name) for name in names]
    with open_store(args.features_path) as store:  # a store or the shards of one
        features = [store.get(image_id(name)) for name in names]

    result = match_features(*features, **dataclasses.asdict(config.matching), seed=config.seed)
    LOGGER.info("Found %d inliers (%d putative matches)", result.num_inliers, result.num_putative)
    title = f"{image_id(names[0])} - {image_id(names[1])}: {result.num_inliers} inliers"
    draw_matches(*(load_image(path) for path in image_paths), result, args.output_image, title=title)
    LOGGER.info("Saved %s", args.output_image)
    if result.transform is None:
        print("no affine transform found")
    else:
        print("affine transform (image 1 (x, y, 1) -> image 2 (x, y)):")
        print(np.array2string(result.transform, precision=4, suppress_small=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
