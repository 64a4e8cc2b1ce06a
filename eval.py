"""Retrieval evaluation on Oxford5k / Paris6k (classic txt or revisited pkl/mat ground truth).

features (src/extraction/dataset.py) -> retrieval (src/retrieval/) -> metrics (src/evaluation/)
-> mAP.txt + metrics.json, run.json + inliers.npz (src/reporting/record.py) and report.html
(src/reporting/report.py). Each stage resumes or can be skipped: extraction skips finished
images, and `--ranks_dir` recomputes the metrics (and the report) from saved ranks alone. Retrieval and matching
settings are the config's `retrieval.*` and `matching.*` keys.

    python eval.py --images_path oxbuild_images --gt_path gt_files_170407 --ckpt_path delf.ckpt \
        --devices 0 --output_dir eval_oxford5k [--retrieval.mode=exhaustive]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model_utils.cli import InputError, cli_main, log_to_file, setup_logging
from model_utils.config import get_config_and_args
from model_utils.files import list_images, require_writable_dir
from src.evaluation.ground_truth import PROTOCOLS, junk_by_protocol, load_ground_truth
from src.evaluation.metrics import evaluate, format_metrics, write_metrics
from src.extraction.dataset import build_feature_dataset, parse_devices
from src.extraction.sharding import add_shard_arguments, is_msrun_scheduler, resolve_shard
from src.extraction.store_set import open_store
from src.reporting.record import VerifiedPairs, run_settings
from src.reporting.report import record_and_report
from src.retrieval.rerank import load_ranks, retrieve, save_ranks


@cli_main
def main(argv: list[str] | None = None) -> int:
    if is_msrun_scheduler():
        return 0  # msrun runs this command as its scheduler too; the extraction ranks need none
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_path", required=True, help="folder holding database and query images")
    parser.add_argument("--gt_path", required=True, help="Oxford/Paris gt txt folder, or gnd_*.pkl / .mat")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--devices", default="0", help="device ids for extraction, one worker each (e.g. 0,1)")
    parser.add_argument("--output_dir", default="eval_output", help="features, ranks, logs, mAP.txt")
    parser.add_argument("--ranks_dir", default="", help="only recompute the metrics from ranks saved here")
    add_shard_arguments(parser)
    config, args = get_config_and_args(argv, parser)
    run_started = time.perf_counter()
    shard = resolve_shard(args.rank_id, args.rank_size)  # under msrun: extract this rank's share, then stop
    output_dir = require_writable_dir(args.output_dir)
    extraction_log = output_dir / "extract_feature.log"
    setup_logging(extraction_log)
    ground_truth = load_ground_truth(args.gt_path, sorted(list_images(args.images_path)))

    failed = {}
    timing, verified, stores = {}, None, (None, None)
    if args.ranks_dir:
        ranks_paths = {p: Path(args.ranks_dir) / f"ranks_{p}.npy" for p in PROTOCOLS}
        missing = [path for path in ranks_paths.values() if not path.is_file()]
        if missing:
            raise InputError(f"saved ranks not found: {missing[0]}")
        ranks = {p: load_ranks(path) for p, path in ranks_paths.items()}
    else:
        index_path, query_path, report = build_feature_dataset(
            args.images_path, ground_truth, output_dir / "features", config, args.ckpt_path,
            parse_devices(args.devices), str(extraction_log), shard)
        timing["extraction"] = time.perf_counter() - run_started
        failed = report.failed
        if failed:
            # A missing image would silently change every number below; stop with the list instead.
            raise InputError(f"{len(failed)} image(s) of the data set could not be extracted (listed in "
                             f"{output_dir / 'features'}/*.failures.txt), e.g. {next(iter(failed.values()))}")
        if shard:
            print(f"{shard}: features in {index_path} and {query_path}; when every rank has finished, run "
                  "the same eval.py command without msrun to retrieve and score")
            return 0
        # Inlier counts of the results the report can show (src/reporting/record.py).
        verified, stores = VerifiedPairs(max(config.retrieval.shortlist_size, config.report.results_per_query)), (
            query_path, index_path)
        with log_to_file("delf.retrieval", output_dir / "retrieval.log") as log:
            started = time.perf_counter()
            with open_store(query_path) as query_store, open_store(index_path) as index_store:
                ranks = retrieve(query_store, index_store, ground_truth["imlist"], ground_truth["qimlist"],
                                 junk_by_protocol(ground_truth), settings=config.retrieval,
                                 matching=config.matching, seed=config.seed, record_verified=verified)
            timing["retrieval"] = time.perf_counter() - started
            log.info("%s retrieval of %d queries over %d images took %.1f s", config.retrieval.mode,
                     len(ground_truth["qimlist"]), len(ground_truth["imlist"]), timing["retrieval"])
        ranks_paths = dict(zip(ranks, save_ranks(ranks, output_dir), strict=True))

    results = evaluate(ranks, ground_truth)
    write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
    text = format_metrics(results)
    with log_to_file("delf.metrics", output_dir / "calculate_mAP.log") as log:
        log.info("%s:\n%s", results["dataset"], text)
    print(text, end="")
    timing["re-scoring" if args.ranks_dir else "total"] = time.perf_counter() - run_started
    page = record_and_report(
        output_dir, command="eval.py --ranks_dir" if args.ranks_dir else "eval.py", ground_truth=ground_truth,
        gt_path=args.gt_path, ranks=ranks, ranks_paths=ranks_paths, results=results, timing=timing,
        settings=None if args.ranks_dir else run_settings(config, args.ckpt_path), report=config.report,
        images_path=args.images_path, stores=stores, verified=verified)
    print(f"wrote {output_dir / 'mAP.txt'}, {output_dir / 'metrics.json'} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
