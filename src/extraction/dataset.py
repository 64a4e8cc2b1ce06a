"""DELF features of a retrieval data set: all database images, and the queries cropped to their bbx.

Writes `<output_dir>/index_features.h5` (one entry per imlist name) and
`<output_dir>/query_features.h5` (one per qimlist name; features of the bbx crop, as the
Oxford/Paris protocol requires, with locations relative to the crop). The work is split over
devices: one worker process per device id, each extracting a disjoint shard (CPU processes when
there is no accelerator). Finished images are skipped when run again with the same settings;
images that fail are listed in `<store>.failures.txt`.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from model_utils.cli import InputError, setup_logging
from model_utils.config import DelfConfig
from model_utils.device import setup_device
from model_utils.files import atomic_write_text, list_images
from src.extraction.extractor import DelfExtractor, ExtractionReport, extract_to_store, write_failures
from src.extraction.pca import load_pca
from src.extraction.store import FeatureStore
from src.model.weights import build_extraction_model, checkpoint_id

INDEX_STORE = "index_features.h5"
QUERY_STORE = "query_features.h5"


def plan_jobs(images_path: str | Path, ground_truth: dict, output_dir: Path) -> list[tuple]:
    """(store path, image id, image path, crop or None) for every database image and query.

    `ground_truth` is the loaded ground truth (imlist, qimlist, and gnd with each query's bbx).
    """
    database = list_images(images_path, ground_truth["imlist"])
    queries = list_images(images_path, ground_truth["qimlist"])
    jobs = [(output_dir / INDEX_STORE, name, path, None) for name, path in database.items()]
    for name, query in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
        jobs.append((output_dir / QUERY_STORE, name, queries[name], tuple(query["bbx"])))
    return jobs


def _report_path(output_dir: Path, worker_index: int) -> Path:
    return output_dir / f".worker{worker_index}.report.json"


def _worker(worker_index: int, device_id: int, jobs: list[tuple], config: DelfConfig, ckpt_path: str,
            log_path: str, num_workers: int, output_dir: Path) -> None:
    """One process: set up its device, build the network, extract its shard of the jobs."""
    setup_logging(log_path)
    setup_device(config.device_target, device_id, graph_mode=config.mode == "graph")
    settings = config.extraction
    extractor = DelfExtractor(build_extraction_model(config, ckpt_path), settings,
                              load_pca(settings) if settings.use_pca else None)
    settings_hash = settings.settings_hash(checkpoint_id(ckpt_path))
    shard = jobs[worker_index::num_workers]
    failed: dict[str, dict[str, str]] = {}
    for store_path in sorted({job[0] for job in shard}):
        mine = [job for job in shard if job[0] == store_path]
        store = FeatureStore(store_path)  # journal writes only; the parent compacts
        report = extract_to_store({job[1]: job[2] for job in mine}, store, extractor, settings_hash,
                                  crops={job[1]: job[3] for job in mine if job[3] is not None},
                                  progress=True, progress_label=f"{Path(store_path).stem} [worker {worker_index}]")
        failed[str(store_path)] = report.failed
    atomic_write_text(_report_path(output_dir, worker_index), json.dumps(failed))


def build_feature_dataset(images_path: str | Path, ground_truth: dict, output_dir: str | Path,
                          config: DelfConfig, ckpt_path: str = "", device_ids: tuple[int, ...] = (0,),
                          log_path: str = "extract_feature.log") -> tuple[Path, Path, ExtractionReport]:
    """Extract (or resume) all features of the data set; returns (index store, query store, failures)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.extraction.use_pca:
        load_pca(config.extraction)  # fail now, not in every worker
    if ckpt_path and not Path(ckpt_path).is_file():
        raise InputError(f"checkpoint not found: {ckpt_path}")
    jobs = plan_jobs(images_path, ground_truth, output_dir)
    for index in range(len(device_ids)):
        _report_path(output_dir, index).unlink(missing_ok=True)
    if len(device_ids) == 1:
        _worker(0, device_ids[0], jobs, config, ckpt_path, log_path, 1, output_dir)
    else:
        # MindSpore is not fork-safe: start clean interpreters.
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker, args=(index, device_id, jobs, config, ckpt_path, log_path,
                                                         len(device_ids), output_dir))
                   for index, device_id in enumerate(device_ids)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [index for index, worker in enumerate(workers) if worker.exitcode != 0]
        if failed:
            raise InputError(f"feature extraction worker(s) {failed} failed (see {log_path}); "
                             "run again to resume")
    report = ExtractionReport()
    by_store: dict[str, dict[str, str]] = {str(output_dir / name): {} for name in (INDEX_STORE, QUERY_STORE)}
    for index in range(len(device_ids)):
        path = _report_path(output_dir, index)
        for store_path, failures in json.loads(path.read_text()).items():
            by_store[store_path].update(failures)
        path.unlink()
    for store_path, failures in by_store.items():
        with FeatureStore(store_path) as store:
            store.compact()
        write_failures(store_path, failures)
        report.failed.update(failures)
    return output_dir / INDEX_STORE, output_dir / QUERY_STORE, report


def parse_devices(devices: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in devices.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--devices: expected comma-separated device ids like 0,1 got {devices!r}") from None
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"--devices: expected distinct device ids like 0,1 got {devices!r}")
    return ids
