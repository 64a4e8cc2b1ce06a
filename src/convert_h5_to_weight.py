"""Convert Keras ResNet50 ImageNet weights (.h5) to a MindSpore checkpoint of the DELF backbone
(src/model/weights.py).

    python -m src.convert_h5_to_weight --h5_path resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --ckpt_path resnet50_imagenet.ckpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/convert_h5_to_weight.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import require_writable  # noqa: E402
from src.model.weights import convert  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h5_path", required=True, help="Keras resnet50_..._notop.h5")
    parser.add_argument("--ckpt_path", required=True, help="MindSpore checkpoint to write")
    args = parser.parse_args(argv)
    require_writable(args.ckpt_path, "checkpoint")
    weights = convert(args.h5_path, args.ckpt_path)
    print(f"converted {len(weights.tensors)} tensors ({weights.scheme} layout, BatchNorm epsilon "
          f"{weights.bn_epsilon:g}) -> {args.ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
