"""Extract the DELF features of a retrieval data set: database images and bbx-cropped queries
(src/extraction/dataset.py), one worker per device, or one rank of an msrun job (store shards).

    python -m src.build_feature_dataset --images_path oxbuild_images --gt_path gt_files_170407 \
        --ckpt_path delf.ckpt --output_dir features --devices 0,1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/build_feature_dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main, report_failures, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.files import list_images, require_writable, require_writable_dir  # noqa: E402
from src.evaluation.ground_truth import load_ground_truth  # noqa: E402
from src.extraction.dataset import build_feature_dataset, parse_devices  # noqa: E402
from src.extraction.sharding import add_shard_arguments, is_msrun_scheduler, resolve_shard  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    if is_msrun_scheduler():
        return 0  # msrun runs this command as its scheduler too; the ranks need no scheduling
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images_path", required=True, help="folder holding database and query images")
    parser.add_argument("--gt_path", required=True, help="Oxford/Paris gt txt folder, or gnd_*.pkl / .mat")
    parser.add_argument("--output_dir", required=True, help="where the two feature stores go")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--devices", default="0", help="device ids, one worker each (e.g. 0,1)")
    parser.add_argument("--log_path", default="extract_feature.log", help="log file")
    add_shard_arguments(parser)
    config, args = get_config_and_args(argv, parser)
    shard = resolve_shard(args.rank_id, args.rank_size)
    require_writable_dir(args.output_dir)
    require_writable(args.log_path, "log file")
    setup_logging(args.log_path)
    ground_truth = load_ground_truth(args.gt_path, sorted(list_images(args.images_path)))
    index_store, query_store, report = build_feature_dataset(
        args.images_path, ground_truth, args.output_dir, config, args.ckpt_path, parse_devices(args.devices),
        args.log_path, shard)
    print(f"{f'{shard}: ' if shard else ''}features: {index_store} and {query_store}")
    return report_failures(list(report.failed.values()), "<store>.failures.txt", config.skip_bad_images)


if __name__ == "__main__":
    sys.exit(main())
