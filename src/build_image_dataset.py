"""Build the GLDv2 training set as MindRecord shards (src/training/build_image_dataset.py).

    python -m src.build_image_dataset --train_csv_path train.csv --train_clean_csv_path train_clean.csv \
        --train_directory train/ --output_directory mindrecord/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/build_image_dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import require_writable_dir  # noqa: E402
from src.training.build_image_dataset import build_image_dataset, default_num_workers, print_report  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=build_image_dataset.__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_csv_path", required=True, help="GLDv2 train.csv (id,url,landmark_id)")
    parser.add_argument("--train_clean_csv_path", default=None,
                        help="GLDv2 train_clean.csv (landmark_id,images); omit to keep all of train.csv")
    parser.add_argument("--train_directory", required=True,
                        help="root of the extracted images: <dir>/a/b/c/abc....jpg")
    parser.add_argument("--output_directory", required=True, help="where the MindRecord shards go")
    parser.add_argument("--num_shards", type=int, default=128, help="shards per split (default 128)")
    parser.add_argument("--validation_split_size", type=float, default=0.2,
                        help="fraction of each class held out for validation; 0 = none (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and write order")
    parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                        help="image reader processes; 0 = read in this process")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished output directory")
    args = parser.parse_args(argv)
    require_writable_dir(args.output_directory, create=False)
    report = build_image_dataset(args.train_csv_path, args.train_clean_csv_path, args.train_directory,
                                 args.output_directory, num_shards=args.num_shards,
                                 validation_split_size=args.validation_split_size, seed=args.seed,
                                 num_workers=args.num_workers, overwrite=args.overwrite)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
