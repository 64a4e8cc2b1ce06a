"""DELF features of a retrieval data set: all database images, and the queries cropped to their bbx.

Writes `<output_dir>/index_features.h5` (one entry per imlist name) and
`<output_dir>/query_features.h5` (one per qimlist name; features of the bbx crop, as the
Oxford/Paris protocol requires, with locations relative to the crop). The work is split over
DEVICES: one worker process per device id, each extracting a disjoint shard (CPU processes when
there is no accelerator). Finished images are skipped when run again with the same settings.

    python -m src.build_feature_dataset --images_path oxbuild_images --gt_path gt_files_170407 \
        --ckpt_path delf.ckpt --output_dir features --devices 0,1
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/build_feature_dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.config import DelfConfig  # noqa: E402
from src.dataset import image_names_in, load_ground_truth  # noqa: E402
from src.errors import InputError, cli_main  # noqa: E402
from src.feature_io import FeatureStore  # noqa: E402
from src.image_io import find_images  # noqa: E402

LOGGER = logging.getLogger("delf.build_features")
INDEX_STORE = "index_features.h5"
QUERY_STORE = "query_features.h5"


def plan_jobs(images_path: str | Path, ground_truth: dict, output_dir: Path) -> list[tuple]:
    """(store path, image id, image path, crop or None) for every database image and query."""
    database = find_images(images_path, ground_truth["imlist"])
    queries = find_images(images_path, ground_truth["qimlist"])
    jobs = [(output_dir / INDEX_STORE, name, path, None) for name, path in database.items()]
    for name, query in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
        jobs.append((output_dir / QUERY_STORE, name, queries[name], tuple(query["bbx"])))
    return jobs


def _worker(worker_index: int, device_id: int, jobs: list[tuple], config: DelfConfig, ckpt_path: str,
            log_path: str, num_workers: int) -> None:
    """One process: set up its device, build the network, extract its shard of the jobs."""
    from model_utils.device import setup_device
    from src.extract_feature import (
        DelfExtractor,
        checkpoint_id,
        extract_to_store,
        load_extraction_model,
        setup_logging,
    )
    from src.extract_utils_np import load_pca

    setup_logging(log_path)
    target = setup_device(config.device_target, device_id, graph_mode=config.mode == "graph")
    model = load_extraction_model(ckpt_path, target, config.conv_impl, config.bn_epsilon,
                                  config.use_autoencoder, config.autoencoder_dim, config.seed)
    settings = config.extraction
    extractor = DelfExtractor(model, settings, load_pca(settings) if settings.use_pca else None)
    settings_hash = settings.settings_hash(checkpoint_id(ckpt_path))
    shard = jobs[worker_index::num_workers]
    for store_path in sorted({job[0] for job in shard}):
        mine = [job for job in shard if job[0] == store_path]
        store = FeatureStore(store_path)  # journal writes only; the parent compacts
        extract_to_store({job[1]: job[2] for job in mine}, store, extractor, settings_hash,
                         crops={job[1]: job[3] for job in mine if job[3] is not None},
                         progress=True, progress_label=f"{Path(store_path).stem} [worker {worker_index}]")


def build_feature_dataset(images_path: str | Path, ground_truth: dict, output_dir: str | Path,
                          config: DelfConfig, ckpt_path: str = "", device_ids: tuple[int, ...] = (0,),
                          log_path: str = "extract_feature.log") -> tuple[Path, Path]:
    """Extract (or resume) all features of the data set; returns (index store, query store)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.extraction.use_pca:
        from src.extract_utils_np import load_pca

        load_pca(config.extraction)  # fail now, not in every worker
    if ckpt_path and not Path(ckpt_path).is_file():
        raise InputError(f"checkpoint not found: {ckpt_path}")
    jobs = plan_jobs(images_path, ground_truth, output_dir)
    if len(device_ids) == 1:
        _worker(0, device_ids[0], jobs, config, ckpt_path, log_path, 1)
    else:
        # MindSpore is not fork-safe: start clean interpreters.
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker, args=(index, device_id, jobs, config, ckpt_path, log_path,
                                                         len(device_ids)))
                   for index, device_id in enumerate(device_ids)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [index for index, worker in enumerate(workers) if worker.exitcode != 0]
        if failed:
            raise InputError(f"feature extraction worker(s) {failed} failed (see {log_path}); "
                             "run again to resume")
    for name in (INDEX_STORE, QUERY_STORE):
        with FeatureStore(output_dir / name) as store:
            store.compact()
    return output_dir / INDEX_STORE, output_dir / QUERY_STORE


def parse_devices(devices: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in devices.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--devices: expected comma-separated device ids like 0,1 got {devices!r}") from None
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"--devices: expected distinct device ids like 0,1 got {devices!r}")
    return ids


@cli_main
def main(argv: list[str] | None = None) -> None:
    from model_utils.config import get_config_and_args
    from src.extract_feature import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_path", required=True, help="folder holding database and query images")
    parser.add_argument("--gt_path", required=True, help="Oxford/Paris gt txt folder, or gnd_*.pkl / .mat")
    parser.add_argument("--output_dir", required=True, help="where the two feature stores go")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--devices", default="0", help="device ids, one worker each (e.g. 0,1)")
    parser.add_argument("--log_path", default="extract_feature.log", help="log file")
    config, args = get_config_and_args(argv, parser)
    setup_logging(args.log_path)
    ground_truth = load_ground_truth(args.gt_path, image_names_in(args.images_path))
    index_store, query_store = build_feature_dataset(args.images_path, ground_truth, args.output_dir, config,
                                                     args.ckpt_path, parse_devices(args.devices), args.log_path)
    print(f"features: {index_store} and {query_store}")


if __name__ == "__main__":
    main()
