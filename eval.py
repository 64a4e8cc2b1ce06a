"""Retrieval evaluation on Oxford5k / Paris6k (classic txt or revisited pkl/mat ground truth).

features (src/extraction/dataset.py) -> retrieval (src/retrieval/) -> metrics (src/evaluation/)
-> mAP.txt + metrics.json. Each stage resumes or can be skipped: extraction skips finished
images, and `--ranks_dir` recomputes the metrics from saved ranks alone. Retrieval and matching
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
    shard = resolve_shard(args.rank_id, args.rank_size)  # under msrun: extract this rank's share, then stop
    output_dir = require_writable_dir(args.output_dir)
    extraction_log = output_dir / "extract_feature.log"
    setup_logging(extraction_log)
    ground_truth = load_ground_truth(args.gt_path, sorted(list_images(args.images_path)))

    failed = {}
    if args.ranks_dir:
        missing = [p for p in PROTOCOLS if not (Path(args.ranks_dir) / f"ranks_{p}.npy").is_file()]
        if missing:
            raise InputError(f"saved ranks not found: {Path(args.ranks_dir) / f'ranks_{missing[0]}.npy'}")
        ranks = {p: load_ranks(Path(args.ranks_dir) / f"ranks_{p}.npy") for p in PROTOCOLS}
    else:
        index_path, query_path, report = build_feature_dataset(
            args.images_path, ground_truth, output_dir / "features", config, args.ckpt_path,
            parse_devices(args.devices), str(extraction_log), shard)
        failed = report.failed
        if failed:
            # A missing image would silently change every number below; stop with the list instead.
            raise InputError(f"{len(failed)} image(s) of the data set could not be extracted (listed in "
                             f"{output_dir / 'features'}/*.failures.txt), e.g. {next(iter(failed.values()))}")
        if shard:
            print(f"{shard}: features in {index_path} and {query_path}; when every rank has finished, run "
                  "the same eval.py command without msrun to retrieve and score")
            return 0
        with log_to_file("delf.retrieval", output_dir / "retrieval.log") as log:
            started = time.perf_counter()
            with open_store(query_path) as query_store, open_store(index_path) as index_store:
                ranks = retrieve(query_store, index_store, ground_truth["imlist"], ground_truth["qimlist"],
                                 junk_by_protocol(ground_truth), settings=config.retrieval,
                                 matching=config.matching, seed=config.seed)
            log.info("%s retrieval of %d queries over %d images took %.1f s", config.retrieval.mode,
                     len(ground_truth["qimlist"]), len(ground_truth["imlist"]), time.perf_counter() - started)
        save_ranks(ranks, output_dir)

    results = evaluate(ranks, ground_truth)
    write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
    text = format_metrics(results)
    with log_to_file("delf.metrics", output_dir / "calculate_mAP.log") as log:
        log.info("%s:\n%s", results["dataset"], text)
    print(text, end="")
    print(f"wrote {output_dir / 'mAP.txt'} and {output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
