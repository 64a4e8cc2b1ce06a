"""Extract DELF features of a folder of images into an HDF5 feature store (src/extraction/).

    python -m src.extract_feature --images_path DIR --ckpt_path delf.ckpt --output_path features.h5

Resumable: a rerun skips images already extracted with the same settings. Images that cannot be
processed are listed at the end and in `<output_path>.failures.txt`; the exit status is 1 when
any failed, unless `--skip_bad_images=true`.

Under msrun each rank extracts images r::N of the sorted list into features.rank<r>-of-<N>.h5
(src/extraction/sharding.py); readers take `--output_path` as the name of the whole set. msrun
stops every rank when one exits non-zero, so scripts/run_distributed_extract.sh passes
`--status_dir`: a rank whose images failed then exits 0 and the launcher reports them.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \
        python src/extract_feature.py --images_path DIR --output_path features.h5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/extract_feature.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main, report_failures, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.device import setup_device  # noqa: E402
from model_utils.files import (  # noqa: E402
    atomic_write_text,
    list_images,
    read_image_list,
    require_writable,
    require_writable_dir,
)
from src.extraction.extractor import (  # noqa: E402
    DelfExtractor,
    extract_folder,
    failures_path,
    features_settings_hash,
)
from src.extraction.pca import load_pca  # noqa: E402
from src.extraction.sharding import (  # noqa: E402
    add_shard_arguments,
    check_output_layout,
    device_id,
    is_msrun_scheduler,
    resolve_shard,
)
from src.extraction.store_set import ensure_store  # noqa: E402
from src.model.weights import build_extraction_model, checkpoint_id  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    if is_msrun_scheduler():
        return 0  # msrun runs this command as its scheduler too; the ranks need no scheduling
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_path", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output_path", required=True, help="feature store (.h5) to create or resume")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--list_images_path", default="", help="only the image names listed in this file")
    parser.add_argument("--log_path", default="extract_feature.log", help="log file ('' for none)")
    parser.add_argument("--status_dir", default="",
                        help="write the exit status and a one-line summary to DIR/rank<r>.status and exit 0 when "
                        "only images failed: msrun stops every rank when one exits non-zero "
                        "(scripts/run_distributed_extract.sh reads them)")
    add_shard_arguments(parser)
    config, args = get_config_and_args(argv, parser)
    shard = resolve_shard(args.rank_id, args.rank_size)
    output_path = shard.store(args.output_path) if shard else args.output_path
    require_writable(output_path, "feature store")
    if args.log_path:
        require_writable(args.log_path, "log file")
    if args.status_dir:
        require_writable_dir(args.status_dir, "status folder")
    setup_logging(args.log_path)
    check_output_layout(args.output_path, shard)
    names = read_image_list(args.list_images_path) if args.list_images_path else None
    image_paths = list_images(args.images_path, names)
    if shard:
        image_paths = shard.take(image_paths)
    settings = config.extraction
    pca = load_pca(settings) if settings.use_pca else None
    # Graph mode compiles the network once (graph_shapes dynamic), then runs several times faster than PyNative.
    setup_device(config.device_target, device_id(config.device_id), graph_mode=config.mode == "graph")
    extractor = DelfExtractor(build_extraction_model(config, args.ckpt_path), settings, pca, config.graph_shapes)
    settings_hash = features_settings_hash(settings, checkpoint_id(args.ckpt_path), pca)
    report = extract_folder(image_paths, output_path, extractor, settings_hash)
    if shard:
        ensure_store(output_path)  # a rank with no images (or only failures) still completes the set
    print(f"{f'{shard}: ' if shard else ''}{report.extracted} images extracted, {report.skipped} already done "
          f"-> {output_path}")
    status = report_failures(list(report.failed.values()), failures_path(output_path), config.skip_bad_images)
    if args.status_dir:
        summary = (f"{shard or 'the run'}: {len(report.failed)} image(s) failed, listed in {failures_path(output_path)}"
                   " (--skip_bad_images=true accepts them)")
        atomic_write_text(Path(args.status_dir) / f"rank{shard.rank if shard else 0}.status", f"{status}\n{summary}\n")
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
