"""Score a retrieval ranking against Oxford/Paris (or revisited) ground truth; writes mAP.txt and
metrics.json (src/evaluation/).

    python -m src.dataset --ranks_path ranks_medium.npy --gt_path gt_files_170407 --images_dir oxbuild_images \
        --output_dir OUT
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import list_images, require_writable_dir  # noqa: E402
from src.evaluation.ground_truth import load_ground_truth  # noqa: E402
from src.evaluation.metrics import evaluate, format_metrics, write_metrics  # noqa: E402
from src.retrieval.rerank import load_ranks  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks_path", required=True,
                        help="ranks.npy, shape (database size, number of queries): column i = "
                        "database indices for query i, best first")
    parser.add_argument("--gt_path", required=True,
                        help="directory of Oxford/Paris *_query/_good/_ok/_junk.txt files, or a "
                        "revisitop gnd_*.pkl / gnd_*.mat")
    parser.add_argument("--images_dir", default=None,
                        help="database images (txt ground truth only): their names, sorted, are the "
                        "database order the ranks refer to (default: every name in the gt files)")
    parser.add_argument("--output_dir", required=True, help="where mAP.txt and metrics.json go")
    args = parser.parse_args(argv)
    output_dir = require_writable_dir(args.output_dir)
    image_names = sorted(list_images(args.images_dir)) if args.images_dir else None
    ground_truth = load_ground_truth(args.gt_path, image_names)
    results = evaluate(load_ranks(args.ranks_path), ground_truth)
    write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
    print(format_metrics(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
