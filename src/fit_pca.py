"""Learn DELF PCA parameters from a feature store of raw (non-PCA) descriptors (src/extraction/pca.py).

    python -m src.fit_pca --features index_raw.h5 --output_dir pca/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/fit_pca.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.config import ExtractionConfig  # noqa: E402
from model_utils.files import require_writable_dir  # noqa: E402
from src.extraction.pca import DEFAULT_MAX_DESCRIPTORS, learn_pca  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="feature store (.h5) extracted with use_pca: false")
    parser.add_argument("--output_dir", required=True, help="where to write mean.npy, pca_proj_mat.npy, ...")
    parser.add_argument("--max_descriptors", type=int, default=DEFAULT_MAX_DESCRIPTORS,
                        help="use a uniform random subset of at most this many descriptors (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the subset (default 0)")
    parser.add_argument("--feature_depth", type=int, default=ExtractionConfig.feature_depth,
                        help="raw descriptor depth (default %(default)s, block3 of ResNet50)")
    args = parser.parse_args(argv)
    require_writable_dir(args.output_dir, create=False)  # a refused input must leave no folder behind
    params, count = learn_pca(args.features, args.output_dir, args.feature_depth, args.max_descriptors, args.seed)
    if count <= args.feature_depth:
        print(f"warning: only {count} descriptors for {args.feature_depth} dimensions; "
              "the trailing components are not meaningful")
    top = min(40, args.feature_depth)
    explained = params.variances[:top].sum() / max(params.variances.sum(), 1e-12)
    print(f"fitted PCA on {count} descriptors (the first {top} components explain {explained:.1%} of the "
          f"variance); wrote mean.npy, pca_proj_mat.npy, pca_variances.npy to {args.output_dir}")
    return 0


if __name__ == "__main__":
    main()
