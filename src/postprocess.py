"""Turn the runner's DELF network outputs into a feature store (keypoint selection, NMS, PCA as in
direct extraction; src/ascend310/postprocess.py), then delete the work directory's files.

    python -m src.postprocess --work_path WORK --mindir_path DELF_MindIR.mindir --output_dir FEATURES

The exit status is 1 when an image failed (listed in <store>.failures.txt), unless --skip_bad_images=true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/postprocess.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.files import require_writable, require_writable_dir  # noqa: E402
from src.ascend310.driver import print_summary  # noqa: E402
from src.ascend310.postprocess import postprocess  # noqa: E402
from src.ascend310.protocol import work_dir_lock  # noqa: E402
from src.ascend310.runner import model_id, model_network  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_path", required=True, help="the preprocess work directory")
    parser.add_argument("--mindir_path", required=True, help="the MindIR the runner used (identifies the weights)")
    parser.add_argument("--output_dir", required=True, help="directory of the feature store(s)")
    parser.add_argument("--keep_outputs", action="store_true", help="keep the work directory's files")
    parser.add_argument("--log_path", default="", help="log file of per-image feature counts ('' for none)")
    config, args = get_config_and_args(argv, parser)
    require_writable_dir(args.output_dir)
    if args.log_path:
        require_writable(args.log_path, "log file")
    setup_logging(args.log_path or None)
    with work_dir_lock(args.work_path):
        reports = postprocess(args.work_path, args.output_dir, config.extraction, model_id(args.mindir_path),
                              keep_outputs=args.keep_outputs, network=model_network(args.mindir_path))
    return print_summary(reports, args.output_dir, config.skip_bad_images)


if __name__ == "__main__":
    sys.exit(main())
