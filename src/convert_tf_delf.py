"""Import a released TF DELF or DELG model as a MindSpore checkpoint and a config preset (with its PCA as
.npy files for DELF): delf_v1_20171026, delf_gld_20190411 (src/model/tf_delf.py); r50delg_gld_20200814,
r101delg_gld_20200814, r50delg_gldv2clean_20200914, r101delg_gldv2clean_20200914 (src/model/tf_delg.py).
TensorFlow is not needed.

    python src/convert_tf_delf.py --model_dir delf_v1_20171026/model --ckpt_path delf_v1.ckpt
    python src/convert_tf_delf.py --model_dir r50delg_gldv2clean_20200914 --ckpt_path r50delg_gldv2clean.ckpt
    python src/convert_tf_delf.py --model_dir r50delg_gldv2clean_20200914 --list
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
    parser.add_argument("--model_dir", required=True,
                        help="the release's SavedModel folder: <name>/model (DELF), <name> (DELG)")
    parser.add_argument("--ckpt_path", default="", help="checkpoint to write; <stem>.yaml (and <stem>_pca/) beside it")
    parser.add_argument("--preset", choices=("delf_v1", "delf_gld", "r50delg_gld", "r101delg_gld",
                                             "r50delg_gldv2clean", "r101delg_gldv2clean"), default="",
                        help="release settings for the preset (default: guessed from the folder name)")
    parser.add_argument("--list", action="store_true", help="print every variable with dtype, shape and mapping")
    args = parser.parse_args(argv)

    from src.model import tf_delf, tf_delg

    importer = tf_delg if tf_delg.is_delg_release(args.model_dir, args.preset) else tf_delf
    if args.list:
        print("\n".join(importer.list_variables(args.model_dir)))
        return 0
    if not args.ckpt_path:
        raise InputError("--ckpt_path is required (or --list)")
    from model_utils.files import require_writable

    require_writable(args.ckpt_path, "checkpoint")
    result = importer.import_release(args.model_dir, args.ckpt_path, args.preset)
    weights = result.weights
    if importer is tf_delg:
        graph = weights.graph
        print(f"imported {len(weights.tensors)} tensors of DELG R{weights.depth} from {args.model_dir} (BatchNorm "
              f"epsilon {graph.bn_epsilon:g}, attention {graph.attention_bn_epsilon:g}, from {graph.source}) "
              f"-> {result.ckpt_path}")
    else:
        print(f"imported {len(weights.tensors)} tensors from {args.model_dir} (BatchNorm epsilon "
              f"{weights.bn_epsilon:g}, from {weights.bn_epsilon_source}) -> {result.ckpt_path}")
    for name, reason in sorted(weights.ignored.items()):
        print(f"  ignored {name}: {reason}")
    if getattr(result, "pca_paths", None):
        print(f"PCA -> {', '.join(str(path) for path in result.pca_paths.values())}")
    print(f"preset '{result.preset}' -> {result.preset_path} (use: --config_path {result.preset_path} "
          f"--ckpt_path {result.ckpt_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
