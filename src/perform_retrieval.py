"""Rank a database for every query with stored DELF features (src/retrieval/); writes ranks_<protocol>.npy,
mAP.txt, metrics.json, run.json + inliers.npz and report.html (with pictures when --images_path is given).

    python -m src.perform_retrieval --query_features Q.h5 --index_features I.h5 --gt_path GT \
        --output_dir OUT [--images_path DIR] [--asmk_index DIR] [--retrieval.mode=global|exhaustive]

The asmk mode (default) keeps its index in I.h5.asmk/ beside the store (built on first use,
completed when images are added), or in --asmk_index; the global mode (DELG global descriptors)
in I.h5.global/, or in --global_index.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/perform_retrieval.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import InputError, cli_main, log_to_file, setup_logging  # noqa: E402
from model_utils.config import get_config_and_args  # noqa: E402
from model_utils.files import list_images, require_writable_dir  # noqa: E402
from src.evaluation.ground_truth import junk_by_protocol, load_ground_truth  # noqa: E402
from src.evaluation.metrics import evaluate, format_metrics, write_metrics  # noqa: E402
from src.extraction.store_set import open_store  # noqa: E402
from src.reporting.record import VerifiedPairs, run_settings  # noqa: E402
from src.reporting.report import record_and_report  # noqa: E402
from src.retrieval.rerank import retrieve, save_ranks  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query_features", required=True, help="feature store (.h5) of the queries, cropped to bbx")
    parser.add_argument("--index_features", required=True, help="feature store (.h5) of the database images")
    parser.add_argument("--gt_path", required=True,
                        help="Oxford/Paris gt txt directory, or a revisitop gnd_*.pkl / gnd_*.mat")
    parser.add_argument("--images_path", default=None,
                        help="image directory: the report's pictures; with txt gt its sorted names are the database")
    parser.add_argument("--output_dir", required=True, help="where ranks_*.npy, mAP.txt and retrieval.log go")
    parser.add_argument("--asmk_index", default="", help="ASMK index folder (default: <index_features>.asmk)")
    parser.add_argument("--global_index", default="",
                        help="global-descriptor index folder (default: <index_features>.global)")
    config, args = get_config_and_args(argv, parser)
    output_dir = require_writable_dir(args.output_dir)
    image_names = sorted(list_images(args.images_path)) if args.images_path else None
    if image_names is None and Path(args.gt_path).is_dir():
        raise InputError(f"--images_path is needed with the txt ground truth in {args.gt_path} (it fixes the database)")
    ground_truth = load_ground_truth(args.gt_path, image_names)
    setup_logging()
    verified = VerifiedPairs(max(config.retrieval.shortlist_size, config.report.results_per_query))
    with log_to_file("delf.retrieval", output_dir / "retrieval.log") as log:
        log.info("settings: %s, %s, seed %d", config.retrieval, config.matching, config.seed)
        started = time.perf_counter()
        with open_store(args.query_features) as query_store, open_store(args.index_features) as index_store:
            ranks = retrieve(query_store, index_store, ground_truth["imlist"], ground_truth["qimlist"],
                             junk_by_protocol(ground_truth), settings=config.retrieval, matching=config.matching,
                             seed=config.seed, asmk_index_dir=args.asmk_index or None,
                             global_index_dir=args.global_index or None, record_verified=verified)
        timing = {"retrieval": time.perf_counter() - started}
        log.info("retrieval took %.1f s", timing["retrieval"])
        ranks_paths = dict(zip(ranks, save_ranks(ranks, output_dir), strict=True))
        for path in ranks_paths.values():
            log.info("wrote %s", path)
        results = evaluate(ranks, ground_truth)
        write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
        text = format_metrics(results)
        log.info("metrics:\n%s", text)
        timing["total"] = time.perf_counter() - started
        settings = run_settings(config, None)
        settings["model"], settings["extraction"] = f"the one of the feature stores ({args.index_features})", None
        page = record_and_report(
            output_dir, command="src.perform_retrieval", ground_truth=ground_truth, gt_path=args.gt_path,
            ranks=ranks, ranks_paths=ranks_paths, results=results, settings=settings, timing=timing,
            report=config.report, images_path=args.images_path,
            stores=(Path(args.query_features), Path(args.index_features)), verified=verified)
        log.info("wrote %s", page)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
