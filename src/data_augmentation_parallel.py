"""Show what the training input pipeline yields for a built GLDv2 MindRecord dataset (src/training/data.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/data_augmentation_parallel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from src.training.data import create_dataset, read_num_classes  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show what the training input pipeline yields "
                                                 "for a built GLDv2 MindRecord dataset.")
    parser.add_argument("path", help="first train shard (.../train.mindrecord000) or its directory")
    parser.add_argument("--image_size", type=int, default=321)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_augmentation", action="store_true", help="plain resize instead of random crops")
    parser.add_argument("--num_batches", type=int, default=2, help="batches to read and describe")
    args = parser.parse_args(argv)
    print(f"classes: {read_num_classes(args.path)}")
    dataset = create_dataset(args.path, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
                             augmentation=not args.no_augmentation)
    print(f"batches per epoch: {dataset.get_dataset_size()}")
    iterator = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    for index, (images, labels) in zip(range(args.num_batches), iterator, strict=False):
        print(f"batch {index}: image {images.shape} {images.dtype} in [{images.min():.3f}, {images.max():.3f}], "
              f"labels {labels.dtype} {labels.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
