"""DELF features of a retrieval data set: all database images, and the queries cropped to their bbx.

Writes `<output_dir>/index_features.h5` (one entry per imlist name) and
`<output_dir>/query_features.h5` (one per qimlist name; features of the bbx crop, as the
Oxford/Paris protocol requires, with locations relative to the crop). The work is split over
devices: one worker process per device id, each extracting a disjoint shard (CPU processes when
there is no accelerator). Finished images are skipped when run again with the same settings;
images that fail are listed in `<store>.failures.txt`.

Under msrun (or with a `Shard` given) this process is one rank: it extracts images r::N of each
store's sorted list into `index_features.rank<r>-of-<N>.h5` / `query_features.rank<r>-of-<N>.h5`.
A later run in one process (eval.py) finds those shards complete and reads them as the stores.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from model_utils.cli import InputError, setup_logging
from model_utils.config import DelfConfig
from model_utils.device import setup_device
from model_utils.files import atomic_write_text
from src.extraction.extractor import (
    DelfExtractor,
    ExtractionReport,
    extract_to_store,
    features_settings_hash,
    write_failures,
)
from src.extraction.pca import PcaParameters, load_pca
from src.extraction.sharding import INDEX_STORE, QUERY_STORE, Shard, check_output_layout, device_id, plan_jobs
from src.extraction.store import FeatureStore
from src.extraction.store_set import ensure_store, find_shards, open_store, store_exists
from src.model.weights import build_extraction_model, checkpoint_id


def _report_path(output_dir: Path, worker_index: int) -> Path:
    return output_dir / f".worker{worker_index}.report.json"


def _settings(config: DelfConfig, ckpt_path: str) -> tuple[PcaParameters | None, str]:
    """The PCA (None without) and the settings hash of this run: read once, shared by every worker."""
    pca = load_pca(config.extraction) if config.extraction.use_pca else None
    return pca, features_settings_hash(config.extraction, checkpoint_id(ckpt_path), pca)


def _extract_jobs(jobs: list[tuple], config: DelfConfig, ckpt_path: str, pca: PcaParameters | None,
                  settings_hash: str, device_id: int, label: str) -> dict[str, dict[str, str]]:
    """Set up the device, build the network, extract `jobs`; {store path: {failed image id: reason}}."""
    setup_device(config.device_target, device_id, graph_mode=config.mode == "graph")
    extractor = DelfExtractor(build_extraction_model(config, ckpt_path), config.extraction, pca, config.graph_shapes)
    failed: dict[str, dict[str, str]] = {}
    for store_path in sorted({job[0] for job in jobs}):
        mine = [job for job in jobs if job[0] == store_path]
        store = FeatureStore(store_path)  # journal writes only; the parent compacts
        report = extract_to_store({job[1]: job[2] for job in mine}, store, extractor, settings_hash,
                                  crops={job[1]: job[3] for job in mine if job[3] is not None},
                                  progress=True, progress_label=f"{Path(store_path).stem} [{label}]")
        failed[str(store_path)] = report.failed
    return failed


def _worker(worker_index: int, device_id: int, jobs: list[tuple], config: DelfConfig, ckpt_path: str,
            pca: PcaParameters | None, settings_hash: str, log_path: str, num_workers: int, output_dir: Path) -> None:
    """One process: extract its part of the jobs, report the failures in a file for the parent."""
    setup_logging(log_path)
    failed = _extract_jobs(jobs[worker_index::num_workers], config, ckpt_path, pca, settings_hash, device_id,
                           f"worker {worker_index}")
    atomic_write_text(_report_path(output_dir, worker_index), json.dumps(failed))


def _read_shards(images_path: str | Path, ground_truth: dict, output_dir: Path, config: DelfConfig,
                 ckpt_path: str) -> tuple[Path, Path, ExtractionReport]:
    """The stores were extracted in shards (msrun): check they hold every image, extract nothing."""
    _, settings_hash = _settings(config, ckpt_path)
    jobs = plan_jobs(images_path, ground_truth, output_dir)
    for store_path in (output_dir / INDEX_STORE, output_dir / QUERY_STORE):
        names = sorted(job[1] for job in jobs if job[0] == store_path)
        with open_store(store_path) as store:
            missing = [name for name in names if not store.is_done(name, settings_hash)]
            if missing:
                size = max(find_shards(store_path))
                rank = names.index(missing[0]) % size
                raise InputError(f"{len(missing)} image(s) are missing from the {size} shards of {store_path} "
                                 f"(or were extracted with other settings), e.g. {missing[0]!r} of rank {rank}: "
                                 f"rerun that rank (its failures, if any, are in <shard>.failures.txt)")
    return output_dir / INDEX_STORE, output_dir / QUERY_STORE, ExtractionReport()


def build_feature_dataset(images_path: str | Path, ground_truth: dict, output_dir: str | Path,
                          config: DelfConfig, ckpt_path: str = "", device_ids: tuple[int, ...] = (0,),
                          log_path: str = "extract_feature.log",
                          shard: Shard | None = None) -> tuple[Path, Path, ExtractionReport]:
    """Extract (or resume) all features of the data set; returns (index store, query store, failures).

    With `shard` (one msrun rank): only its share, into its store shards, whose paths are returned.
    Without, when only complete shards of the stores exist, they are checked and returned as is
    (their names: open them with store_set.open_store).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stores = (output_dir / INDEX_STORE, output_dir / QUERY_STORE)
    if ckpt_path and not Path(ckpt_path).is_file():
        raise InputError(f"checkpoint not found: {ckpt_path}")
    if shard is None and not any(map(store_exists, stores)) and any(map(find_shards, stores)):
        return _read_shards(images_path, ground_truth, output_dir, config, ckpt_path)
    pca, settings_hash = _settings(config, ckpt_path)
    for store_path in stores:
        check_output_layout(store_path, shard)
    if shard is not None:
        if len(device_ids) > 1:
            raise InputError(f"{shard} uses one device (msrun's DEVICE_ID under msrun); got devices {device_ids}")
        device_ids = (device_id(device_ids[0]),)
    jobs = plan_jobs(images_path, ground_truth, output_dir, shard)
    if shard is not None:
        stores = (shard.store(stores[0]), shard.store(stores[1]))
    report = ExtractionReport()
    by_store: dict[str, dict[str, str]] = {str(path): {} for path in stores}
    if len(device_ids) == 1:
        for store_path, failures in _extract_jobs(jobs, config, ckpt_path, pca, settings_hash, device_ids[0],
                                                  str(shard) if shard else "worker 0").items():
            by_store[store_path].update(failures)
    else:
        for index in range(len(device_ids)):
            _report_path(output_dir, index).unlink(missing_ok=True)
        # MindSpore is not fork-safe: start clean interpreters.
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker, args=(index, device_id, jobs, config, ckpt_path, pca,
                                                         settings_hash, log_path, len(device_ids), output_dir))
                   for index, device_id in enumerate(device_ids)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [index for index, worker in enumerate(workers) if worker.exitcode != 0]
        if failed:
            raise InputError(f"feature extraction worker(s) {failed} failed (see {log_path}); "
                             "run again to resume")
        for index in range(len(device_ids)):
            path = _report_path(output_dir, index)
            for store_path, failures in json.loads(path.read_text()).items():
                by_store[store_path].update(failures)
            path.unlink()
    for store_path, failures in by_store.items():
        with FeatureStore(store_path) as store:
            store.compact()
            write_failures(store, failures, [job[1] for job in jobs if str(job[0]) == store_path], settings_hash)
        if shard is not None:
            ensure_store(store_path)  # a rank without images of this store still completes the set
        report.failed.update(failures)
    return stores[0], stores[1], report


def parse_devices(devices: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in devices.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--devices: expected comma-separated device ids like 0,1 got {devices!r}") from None
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"--devices: expected distinct device ids like 0,1 got {devices!r}")
    return ids
