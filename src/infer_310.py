"""Extract DELF features with an exported MindIR the Ascend-310 way, chunk by chunk (src/ascend310/driver.py).

    python -m src.infer_310 --mindir_path DELF_MindIR.mindir --images_path DIR --work_path WORK \
        --output_dir FEATURES [--list_images_path LIST | --gt_path GT] [--input_mode exact|canvas] \
        [--runner_binary ascend310_infer/out/main] [--chunk_size 16] [--key=value ...]

Features go to FEATURES/features.h5 (FEATURES/index_features.h5 and query_features.h5 with
--gt_path). Resumable; the exit status is 1 when an image failed, unless --skip_bad_images=true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/infer_310.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import InputError, cli_main, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.device import setup_device  # noqa: E402
from model_utils.files import list_images, read_image_list, require_writable, require_writable_dir  # noqa: E402
from src.ascend310.driver import DEFAULT_CHUNK_SIZE, make_runner, print_summary, run_chunked  # noqa: E402
from src.ascend310.preprocess import INPUT_MODES, plan_jobs  # noqa: E402
from src.evaluation.ground_truth import load_ground_truth  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mindir_path", required=True,
                        help="DELF_MindIR.mindir (static <prefix>_<H>x<W>.mindir beside it are used when present)")
    parser.add_argument("--images_path", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--work_path", required=True, help="scratch directory for one chunk's files")
    parser.add_argument("--output_dir", required=True, help="directory of the feature store(s)")
    parser.add_argument("--list_images_path", default="", help="only the image names listed in this file")
    parser.add_argument("--gt_path", default="", help="retrieval ground truth: database images + cropped queries")
    parser.add_argument("--input_mode", choices=INPUT_MODES, default="exact",
                        help="exact: each level at its size (dynamic MindIR); canvas: padded to static "
                        "per-scale canvases sized by extraction.max_image_size")
    parser.add_argument("--runner_binary", default="",
                        help="the C++ runner (ascend310_infer/out/main); default: the Python MindIR runner")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="images on disk at a time")
    parser.add_argument("--log_path", default="", help="log file ('' for none)")
    config, args = get_config_and_args(argv, parser)
    if args.list_images_path and args.gt_path:
        raise InputError("give --list_images_path or --gt_path, not both")
    if args.chunk_size <= 0:
        raise InputError(f"--chunk_size must be positive, got {args.chunk_size}")
    require_writable_dir(args.work_path, "work folder")
    require_writable_dir(args.output_dir)
    if args.log_path:
        require_writable(args.log_path, "log file")
    setup_logging(args.log_path or None)
    names = read_image_list(args.list_images_path) if args.list_images_path else None
    ground_truth = load_ground_truth(args.gt_path, sorted(list_images(args.images_path))) if args.gt_path else None
    if not args.runner_binary:
        setup_device(config.device_target, config.device_id, graph_mode=False)
    reports = run_chunked(plan_jobs(args.images_path, names, ground_truth), config.extraction, args.mindir_path,
                          make_runner(args.mindir_path, args.runner_binary, config.device_id), args.work_path,
                          args.output_dir, args.input_mode, args.chunk_size)
    return print_summary(reports, args.output_dir, config.skip_bad_images)


if __name__ == "__main__":
    sys.exit(main())
