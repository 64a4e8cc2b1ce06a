"""Retrieval evaluation on Oxford5k / Paris6k (classic txt or revisited pkl/mat ground truth).

features (src/build_feature_dataset.py) -> retrieval (src/perform_retrieval.py) -> metrics
(src/dataset.py) -> mAP.txt + metrics.json. Each stage resumes or can be skipped: extraction skips
finished images, and `--ranks_dir` recomputes the metrics from saved ranks alone.

    python eval.py --images_path oxbuild_images --gt_path gt_files_170407 --ckpt_path delf.ckpt \
        --devices 0 --output_dir eval_oxford5k
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from model_utils.config import get_config_and_args
from src.build_feature_dataset import build_feature_dataset, parse_devices
from src.dataset import PROTOCOLS, evaluate, format_metrics, image_names_in, load_ground_truth, write_metrics
from src.errors import InputError, cli_main
from src.extract_feature import setup_logging
from src.feature_io import FeatureStore
from src.perform_retrieval import retrieve, save_ranks


def _file_logger(name: str, path: Path) -> logging.Logger:
    """A logger writing to its own file (the reference keeps one log per stage)."""
    logger = logging.getLogger(name)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def load_saved_ranks(ranks_dir: Path) -> dict[str, np.ndarray]:
    paths = {protocol: ranks_dir / f"ranks_{protocol}.npy" for protocol in PROTOCOLS}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise InputError(f"saved ranks not found: {missing[0]}")
    return {protocol: np.load(path, allow_pickle=False) for protocol, path in paths.items()}


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_path", required=True, help="folder holding database and query images")
    parser.add_argument("--gt_path", required=True, help="Oxford/Paris gt txt folder, or gnd_*.pkl / .mat")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--devices", default="0", help="device ids for extraction, one worker each (e.g. 0,1)")
    parser.add_argument("--output_dir", default="eval_output", help="features, ranks, logs, mAP.txt")
    parser.add_argument("--retrieval_mode", choices=("fast", "exhaustive"), default="fast",
                        help="fast: vote shortlist + RANSAC re-ranking; exhaustive: RANSAC against every image")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC (fast mode)")
    parser.add_argument("--ranks_dir", default="", help="only recompute the metrics from ranks saved here")
    config, args = get_config_and_args(argv, parser)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(str(output_dir / "extract_feature.log"))
    ground_truth = load_ground_truth(args.gt_path, image_names_in(args.images_path))

    if args.ranks_dir:
        ranks = load_saved_ranks(Path(args.ranks_dir))
    else:
        index_path, query_path = build_feature_dataset(
            args.images_path, ground_truth, output_dir / "features", config, args.ckpt_path,
            parse_devices(args.devices), str(output_dir / "extract_feature.log"))
        retrieval_log = _file_logger("src.perform_retrieval", output_dir / "retrieval.log")
        started = time.perf_counter()
        with FeatureStore(query_path) as query_store, FeatureStore(index_path) as index_store:
            ranks = retrieve(query_store, index_store, ground_truth, mode=args.retrieval_mode,
                             shortlist_size=args.shortlist_size, seed=config.seed)
        retrieval_log.info("%s retrieval of %d queries over %d images took %.1f s", args.retrieval_mode,
                           len(ground_truth["qimlist"]), len(ground_truth["imlist"]), time.perf_counter() - started)
        save_ranks(ranks, output_dir)

    results = evaluate(ranks, ground_truth)
    write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
    text = format_metrics(results)
    _file_logger("delf.metrics", output_dir / "calculate_mAP.log").info("%s:\n%s", results["dataset"], text)
    print(text, end="")
    print(f"wrote {output_dir / 'mAP.txt'} and {output_dir / 'metrics.json'}")


if __name__ == "__main__":
    main()
