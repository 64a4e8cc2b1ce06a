"""What a retrieval run saves for its report, so that `python -m src.report` rebuilds it offline.

`run.json` (beside mAP.txt; JSON, no pickle):

    format, version        "delf-retrieval-run", 1
    command                "eval.py", "eval.py --ranks_dir" or "src.perform_retrieval"
    written                when the run finished (UTC, ISO 8601)
    dataset                the ground truth's name
    gt_path                the ground truth the run read (absolute path)
    ground_truth_sha256    checksum of that ground truth as read (image lists, positives, junk, boxes)
    images_path            the image folder (absolute), or null when the run had none
    query_features, index_features   the feature stores (absolute), or null
    ranks                  {protocol: {"path", "sha256"}}: the ranks_<protocol>.npy files
    inliers                {"path", "sha256", "depth"} of inliers.npz, or null (no re-ranking recorded)
    settings               what made the ranks: retrieval, matching, seed, model, extraction (null: unknown)
    timing                 {stage: seconds}: extraction, retrieval, total, re-scoring (the stages that ran)

Paths of files inside the run's folder are relative to it, so the folder can be moved.

`inliers.npz` (np.savez, read with allow_pickle=False): four int64 arrays of one length, `query`,
`image` (database index), `inliers`, `putative`: every verified (query, image) pair ranked among the
first `depth` places (run.json's) of some protocol's ranking.

Every file is checked when read back: the checksums must match (a rank file changed since the run
is refused, never reported on), and every field must have its type; problems are one line naming
the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_utils.cli import InputError
from model_utils.config import ConfigError, DelfConfig, MatchingConfig
from model_utils.files import atomic_output, atomic_write_text, file_sha256, list_images
from src.evaluation.ground_truth import PROTOCOLS, GroundTruth, load_ground_truth
from src.evaluation.metrics import evaluate
from src.retrieval.rerank import load_ranks

RUN_FILE = "run.json"
INLIERS_FILE = "inliers.npz"
FORMAT, VERSION = "delf-retrieval-run", 1
INLIER_FIELDS = ("query", "image", "inliers", "putative")


def ground_truth_sha256(ground_truth: GroundTruth) -> str:
    """Checksum of a ground truth as read: what the metrics and the report depend on."""
    content = {"imlist": ground_truth["imlist"], "qimlist": ground_truth["qimlist"],
               "gnd": [{key: entry[key] for key in ("easy", "hard", "junk", "bbx")} for entry in ground_truth["gnd"]]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def run_settings(config: DelfConfig, model: str | None) -> dict[str, Any]:
    """The settings of a run that extracted its features (eval.py): retrieval, matching, seed, model, extraction."""
    return {"retrieval": dataclasses.asdict(config.retrieval), "matching": dataclasses.asdict(config.matching),
            "seed": config.seed, "model": model or "untrained (random) weights",
            "extraction": {key: list(value) if isinstance(value, tuple) else value
                           for key, value in dataclasses.asdict(config.extraction).items()}}


class VerifiedPairs:
    """retrieve()'s record_verified hook: keeps the verified pairs ranked within the first `depth` places."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.rows: list[tuple[int, int, int, int]] = []

    def __call__(self, column: int, results: Mapping[int, tuple[int, int]], rankings: Mapping[str, np.ndarray]) -> None:
        shown = set().union(*(np.asarray(ranking[:self.depth]).tolist() for ranking in rankings.values()))
        self.rows.extend((column, image, *results[image]) for image in sorted(shown) if image in results)


@dataclass
class FileRef:
    path: Path  # absolute
    sha256: str


@dataclass
class RunRecord:
    """run.json, read and checked (paths made absolute)."""

    command: str
    written: str
    dataset: str
    gt_path: str
    ground_truth_sha256: str
    images_path: str | None
    query_features: str | None
    index_features: str | None
    ranks: dict[str, FileRef]
    inliers: FileRef | None
    inlier_depth: int
    settings: dict[str, Any] | None
    timing: dict[str, float]


@dataclass
class Run:
    """Everything a report shows: the record, the ground truth, the ranks, the inlier counts and the metrics."""

    record: RunRecord
    ground_truth: GroundTruth
    ranks: dict[str, np.ndarray]
    inliers: dict[tuple[int, int], int]  # (query, database image) -> RANSAC inliers of the verified pairs
    results: dict[str, Any]  # src.evaluation.metrics.evaluate


def _portable(path: Path, folder: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path(os.path.abspath(folder))).as_posix()
    except ValueError:
        return str(path)


def _absolute(text: str | None, folder: Path) -> str | None:
    return None if text is None else os.path.abspath(folder / text)


def write_inliers(path: Path, pairs: VerifiedPairs) -> FileRef:
    rows = np.array(pairs.rows, dtype=np.int64).reshape(-1, len(INLIER_FIELDS))
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **dict(zip(INLIER_FIELDS, rows.T, strict=True)))
    return FileRef(path, file_sha256(path))


def read_inliers(reference: FileRef, num_queries: int, num_images: int) -> dict[tuple[int, int], int]:
    """(query, image) -> inliers from inliers.npz, checked against its checksum and the data set's size."""
    path = reference.path
    if not path.is_file():
        raise InputError(f"{path} is missing (the run recorded its inlier counts there)")
    if file_sha256(path) != reference.sha256:
        raise InputError(f"{path} changed since the run (its checksum differs from the one in {RUN_FILE})")
    try:
        with np.load(path, allow_pickle=False) as content:
            arrays = {name: content[name] for name in INLIER_FIELDS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} is not an inlier file (arrays {', '.join(INLIER_FIELDS)}): {error}") from None
    if len({array.shape for array in arrays.values()}) != 1 or arrays["query"].ndim != 1 or not all(
            np.issubdtype(array.dtype, np.integer) for array in arrays.values()):
        raise InputError(f"{path}: {', '.join(INLIER_FIELDS)} must be 1-D integer arrays of one length")
    queries, images = arrays["query"], arrays["image"]
    if queries.size and (queries.min() < 0 or queries.max() >= num_queries or images.min() < 0
                         or images.max() >= num_images or arrays["inliers"].min() < 0):
        raise InputError(f"{path} holds pairs outside the data set of {num_queries} queries and {num_images} images")
    return dict(zip(zip(queries.tolist(), images.tolist(), strict=True), arrays["inliers"].tolist(), strict=True))


def write_run_record(output_dir: Path, *, command: str, ground_truth: GroundTruth, gt_path: str | os.PathLike,
                     ranks_paths: Mapping[str, Path], settings: dict[str, Any] | None, timing: Mapping[str, float],
                     images_path: str | os.PathLike | None = None,
                     stores: tuple[Path | None, Path | None] = (None, None), inliers: FileRef | None = None,
                     inlier_depth: int = 0) -> Path:
    """Write run.json into output_dir (atomically); returns its path."""
    document = {
        "format": FORMAT, "version": VERSION, "command": command,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": ground_truth.get("dataset", "unknown"),
        "gt_path": os.path.abspath(gt_path), "ground_truth_sha256": ground_truth_sha256(ground_truth),
        "images_path": os.path.abspath(images_path) if images_path else None,
        "query_features": os.path.abspath(stores[0]) if stores[0] else None,
        "index_features": os.path.abspath(stores[1]) if stores[1] else None,
        "ranks": {protocol: {"path": _portable(path, output_dir), "sha256": file_sha256(path)}
                  for protocol, path in ranks_paths.items()},
        "inliers": None if inliers is None else {"path": _portable(inliers.path, output_dir),
                                                 "sha256": inliers.sha256, "depth": inlier_depth},
        "settings": settings,
        "timing": {stage: round(float(seconds), 3) for stage, seconds in timing.items()},
    }
    path = output_dir / RUN_FILE
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def _field(document: dict, key: str, kinds: type | tuple[type, ...], path: Path) -> Any:
    if key not in document:
        raise InputError(f"{path}: field '{key}' is missing")
    value = document[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InputError(f"{path}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _file_ref(entry: Any, what: str, folder: Path, path: Path) -> FileRef:
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)):
        raise InputError(f"{path}: {what} must be an object with 'path' and 'sha256' strings")
    return FileRef(Path(_absolute(entry["path"], folder)), entry["sha256"])


def read_run_record(path: str | os.PathLike) -> RunRecord:
    """run.json, checked field by field (one-line InputError naming the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found: only runs of eval.py or src.perform_retrieval write it "
                         "(rerun the retrieval, or eval.py --ranks_dir to re-score saved ranks)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{path} is not a retrieval run record (format '{FORMAT}')")
    if document.get("version") != VERSION:
        raise InputError(f"{path}: version {document.get('version')!r} is not supported (this code reads {VERSION})")
    folder = path.parent
    ranks = _field(document, "ranks", dict, path)
    if sorted(ranks) != sorted(PROTOCOLS):
        raise InputError(f"{path}: 'ranks' must list the protocols {', '.join(PROTOCOLS)}")
    inliers = _field(document, "inliers", (dict, type(None)), path)
    depth = 0
    if inliers is not None:
        depth = _field(inliers, "depth", int, path)
    timing = _field(document, "timing", dict, path)
    if not all(isinstance(value, int | float) for value in timing.values()):
        raise InputError(f"{path}: 'timing' must map stages to seconds")
    settings = _field(document, "settings", (dict, type(None)), path)
    if settings is not None:  # what the report reads of them
        _field(settings, "retrieval", dict, path)
        _field(settings, "seed", int, path)
        extraction = _field(settings, "extraction", (dict, type(None)), path)
        if extraction is not None:
            _field(extraction, "image_scales", list, path)
        try:  # match pictures verify again with the run's matching settings
            MatchingConfig(**_field(settings, "matching", dict, path))
        except (TypeError, ConfigError) as error:
            raise InputError(f"{path}: 'settings.matching' are not matching settings ({error})") from None
    optional_text = (str, type(None))
    return RunRecord(
        command=_field(document, "command", str, path), written=_field(document, "written", str, path),
        dataset=_field(document, "dataset", str, path), gt_path=_field(document, "gt_path", str, path),
        ground_truth_sha256=_field(document, "ground_truth_sha256", str, path),
        images_path=_absolute(_field(document, "images_path", optional_text, path), folder),
        query_features=_absolute(_field(document, "query_features", optional_text, path), folder),
        index_features=_absolute(_field(document, "index_features", optional_text, path), folder),
        ranks={protocol: _file_ref(entry, f"ranks '{protocol}'", folder, path) for protocol, entry in ranks.items()},
        inliers=None if inliers is None else _file_ref(inliers, "'inliers'", folder, path), inlier_depth=depth,
        settings=settings, timing=timing)


def inherited_record(ranks_paths: Mapping[str, Path], ground_truth: GroundTruth) -> RunRecord | None:
    """The run.json beside re-scored ranks when it describes exactly these rank files (checksums) and this
    ground truth: its settings, timing and inlier counts still hold."""
    folders = {path.parent for path in ranks_paths.values()}
    if len(folders) != 1 or not (next(iter(folders)) / RUN_FILE).is_file():
        return None
    record = read_run_record(next(iter(folders)) / RUN_FILE)
    if record.ground_truth_sha256 != ground_truth_sha256(ground_truth):
        return None
    for protocol, path in ranks_paths.items():
        reference = record.ranks[protocol]
        if not (reference.path.is_file() and os.path.samefile(reference.path, path)
                and reference.sha256 == file_sha256(path)):
            return None
    return record


def load_run(output_dir: str | os.PathLike) -> Run:
    """A finished run, read back from its run.json and checked: ground truth, ranks, inliers, metrics."""
    record_path = Path(output_dir) / RUN_FILE
    record = read_run_record(record_path)
    image_names = None
    if Path(record.gt_path).is_dir():  # the txt ground truth: the image folder fixes the database
        if not record.images_path:
            raise InputError(f"{record_path}: the txt ground truth {record.gt_path} needs the image folder, "
                             "which the run did not record")
        image_names = sorted(list_images(record.images_path))
    ground_truth = load_ground_truth(record.gt_path, image_names)
    if ground_truth_sha256(ground_truth) != record.ground_truth_sha256:
        raise InputError(f"the ground truth {record.gt_path} (or the image folder's list) changed since the run "
                         f"recorded in {record_path}: rerun the retrieval")
    ranks = {}
    for protocol, reference in record.ranks.items():
        if not reference.path.is_file():
            raise InputError(f"{reference.path} is missing (the ranks recorded in {record_path})")
        if file_sha256(reference.path) != reference.sha256:
            raise InputError(f"{reference.path} changed since the run (its checksum differs from the one in "
                             f"{record_path}): rerun eval.py --ranks_dir to re-score it")
        ranks[protocol] = load_ranks(reference.path)
    inliers = {} if record.inliers is None else read_inliers(record.inliers, len(ground_truth["qimlist"]),
                                                             len(ground_truth["imlist"]))
    return Run(record, ground_truth, ranks, inliers, evaluate(ranks, ground_truth))
