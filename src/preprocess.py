"""Write the DELF pyramid inputs of images (raw float32 + a JSON manifest) for the exported network
(src/ascend310/preprocess.py); then run src.infer_mindir (or ascend310_infer/) and src.postprocess.

    python -m src.preprocess --images_path DIR --output_path WORK [--input_mode canvas] \
        [--list_images_path list_images.txt | --gt_path GT] [--key=value ...]

src.infer_310 runs the three steps chunk by chunk, with bounded disk use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/preprocess.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import InputError, cli_main, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.files import list_images, read_image_list, require_writable_dir  # noqa: E402
from src.ascend310.preprocess import INPUT_MODES, plan_jobs, preprocess  # noqa: E402
from src.ascend310.protocol import INPUTS_DIR, work_dir_lock  # noqa: E402
from src.evaluation.ground_truth import load_ground_truth  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images_path", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output_path", required=True, help="work directory (inputs/, outputs/, manifest.json)")
    parser.add_argument("--list_images_path", default="", help="only the image names listed in this file")
    parser.add_argument("--gt_path", default="", help="retrieval ground truth: database images + cropped queries")
    parser.add_argument("--input_mode", choices=INPUT_MODES, default="exact",
                        help="exact: each level at its size (dynamic MindIR); canvas: padded to static "
                        "per-scale canvases sized by extraction.max_image_size")
    config, args = get_config_and_args(argv, parser)
    if args.list_images_path and args.gt_path:
        raise InputError("give --list_images_path or --gt_path, not both")
    require_writable_dir(args.output_path, "work folder")
    setup_logging()
    names = read_image_list(args.list_images_path) if args.list_images_path else None
    ground_truth = load_ground_truth(args.gt_path, sorted(list_images(args.images_path))) if args.gt_path else None
    with work_dir_lock(args.output_path):
        images = preprocess(plan_jobs(args.images_path, names, ground_truth), config.extraction, args.output_path,
                            args.input_mode)
    failed = sum("error" in image for image in images)
    print(f"{len(images) - failed} images -> {Path(args.output_path) / INPUTS_DIR}"
          + (f" ({failed} failed: src.postprocess lists them)" if failed else ""))


if __name__ == "__main__":
    sys.exit(main())
