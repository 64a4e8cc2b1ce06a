"""The Ascend-310 path in one process: for each chunk of images, preprocess -> runner -> postprocess -> delete.

Used by scripts/run_infer_310_*.sh. The work directory holds one chunk at a time (inputs and
outputs: about 135 MB per image for canvas inputs at max_image_size 1024), so the disk stays
bounded without the stages waiting on each other. Images already in their store with the same
settings are skipped, so a killed run resumes where it stopped. As in direct extraction, an image
that fails is listed in `<store>.failures.txt`, never stored, and does not stop the others.

Each chunk runs the runner once: the Python runner keeps its models loaded for the whole run; the
C++ runner is a new process per chunk and builds its models again, so on Ascend a larger chunk
saves build time at the cost of disk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from model_utils.cli import report_failures
from model_utils.config import ExtractionConfig
from src.ascend310.postprocess import check_run, settings_hash, store_outputs
from src.ascend310.preprocess import Job, preprocess
from src.ascend310.protocol import INPUTS_DIR, OUTPUTS_DIR, clear_work_dir, read_manifest, work_dir_lock
from src.ascend310.runner import ModelSet, model_id, model_network, run_binary, run_inference
from src.extraction.extractor import FAILURES_SUFFIX, ExtractionReport, write_failures
from src.extraction.pca import load_pca
from src.extraction.store import FeatureStore

DEFAULT_CHUNK_SIZE = 16

# (inputs dir, outputs dir) -> failed input file name -> reason
Runner = Callable[[Path, Path], Mapping[str, str]]


def make_runner(mindir_path: str | Path, runner_binary: str | Path = "", device_id: int = 0) -> Runner:
    """The C++ binary when given, else the Python runner with the models loaded once (fails now on a bad MindIR)."""
    if runner_binary:
        return functools.partial(run_binary, runner_binary, mindir_path, device_id)
    return functools.partial(run_inference, ModelSet(mindir_path), progress=False)


def run_chunked(jobs: Sequence[Job], config: ExtractionConfig, mindir_path: str | Path, runner: Runner,
                work_dir: str | Path, output_dir: str | Path, input_mode: str = "exact",
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True) -> dict[str, ExtractionReport]:
    """Extract the features of `jobs` into `<output_dir>/<job.store>`; returns a report per store."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    work_dir, output_dir = Path(work_dir), Path(output_dir)
    exported, network = model_id(mindir_path), model_network(mindir_path)
    check_run(network, config, input_mode)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    pca = load_pca(config) if config.use_pca else None
    done_hash = settings_hash(config, exported, input_mode, pca)
    with contextlib.ExitStack() as stack:
        stack.enter_context(work_dir_lock(work_dir))  # one run per work folder
        stores = {name: stack.enter_context(FeatureStore(output_dir / name))
                  for name in sorted({job.store for job in jobs})}
        reports = {name: ExtractionReport() for name in stores}
        todo = []
        for job in jobs:
            if stores[job.store].is_done(job.image_id, done_hash):
                reports[job.store].skipped += 1
            else:
                todo.append(job)
        with tqdm(total=len(todo), desc="infer 310", unit="image", disable=not progress) as bar:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                try:
                    preprocess(chunk, config, work_dir, input_mode, progress=False)
                    runner_failures = runner(work_dir / INPUTS_DIR, work_dir / OUTPUTS_DIR)
                    chunk_reports = store_outputs(read_manifest(work_dir), work_dir / OUTPUTS_DIR, stores, config,
                                                  pca, exported, runner_failures, network)
                finally:
                    clear_work_dir(work_dir)
                for name, report in chunk_reports.items():
                    reports[name].merge(report)
                bar.update(len(chunk))
        for name, report in reports.items():
            write_failures(stores[name], report.failed, [job.image_id for job in jobs if job.store == name], done_hash)
    return reports


def print_summary(reports: Mapping[str, ExtractionReport], output_dir: str | Path, accept_failures: bool) -> int:
    """One line per store, then the failed images (as src.extract_feature); returns the exit status."""
    for name, report in reports.items():
        print(f"{Path(output_dir) / name}: {report.extracted} images extracted, {report.skipped} already done, "
              f"{len(report.failed)} failed")
    failed = [reason for report in reports.values() for reason in report.failed.values()]
    return report_failures(failed, f"<store>{FAILURES_SUFFIX}", accept_failures)
