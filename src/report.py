"""Rebuild the retrieval report (report.html) of a finished run from what it saved: run.json, the ranks,
inliers.npz, the ground truth and the images (and the feature stores, for match pictures).

    python -m src.report OUTPUT_DIR [--report.results_per_query=20] [--report.match_pictures=3]

OUTPUT_DIR is the folder of mAP.txt (eval.py --output_dir, perform_retrieval --output_dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from src.reporting.report import rebuild_report  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's folder (holding run.json and mAP.txt)")
    config, args = get_config_and_args(argv, parser)
    setup_logging()
    print(f"wrote {rebuild_report(args.output_dir, config.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
