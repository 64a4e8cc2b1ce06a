"""Import a released TF1 DELF model (delf_v1_20171026, delf_gld_20190411) as a MindSpore checkpoint,
its PCA as .npy files and a config preset (src/model/tf_delf.py). TensorFlow is not needed.

    python src/convert_tf_delf.py --model_dir delf_v1_20171026/model --ckpt_path delf_v1.ckpt
    python src/convert_tf_delf.py --model_dir delf_v1_20171026/model --list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/convert_tf_delf.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import InputError, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="the release's <name>/model folder (SavedModel)")
    parser.add_argument("--ckpt_path", default="", help="checkpoint to write; <stem>_pca/ and <stem>.yaml go beside it")
    parser.add_argument("--preset", choices=("delf_v1", "delf_gld"), default="",
                        help="release settings for the preset (default: guessed from the folder name)")
    parser.add_argument("--list", action="store_true", help="print every variable with dtype, shape and mapping")
    args = parser.parse_args(argv)

    from src.model import tf_delf

    if args.list:
        print("\n".join(tf_delf.list_variables(args.model_dir)))
        return 0
    if not args.ckpt_path:
        raise InputError("--ckpt_path is required (or --list)")
    from model_utils.files import require_writable

    require_writable(args.ckpt_path, "checkpoint")
    result = tf_delf.import_release(args.model_dir, args.ckpt_path, args.preset)
    weights = result.weights
    print(f"imported {len(weights.tensors)} tensors from {args.model_dir} (BatchNorm epsilon "
          f"{weights.bn_epsilon:g}, from {weights.bn_epsilon_source}) -> {result.ckpt_path}")
    for name, reason in sorted(weights.ignored.items()):
        print(f"  ignored {name}: {reason}")
    if result.pca_paths:
        print(f"PCA -> {', '.join(str(path) for path in result.pca_paths.values())}")
    print(f"preset '{result.preset}' -> {result.preset_path} (use: --config_path {result.preset_path} "
          f"--ckpt_path {result.ckpt_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
