"""Build the GLDv2 training set as MindRecord shards from the downloaded csv files and JPEGs.

Input (the Google Landmarks v2 release, see scripts/download_gldv2.sh):
    train.csv        id,url,landmark_id
    train_clean.csv  landmark_id,images   (images: space-separated ids; optional)
    <train_directory>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg

Output in <output_directory>:
    train.mindrecord<k> + .db        k = 0..num_shards-1, zero-padded by MindSpore's FileWriter
    validation.mindrecord<k> + .db   (when validation_split_size > 0)
    relabeling.csv                   new_label,old_label (the TF reference's columns)
    skipped_images.csv               file_id,reason for every listed image that was left out
    dataset_info.json                class and sample counts; written last, so it marks a finished build

Choices, and where they differ from the TF / MindSpore references:
- Labels are renumbered 0..C-1 in sorted landmark order over the images present on disk, so a
  partial download trains a classifier of the right size (with everything downloaded this is the
  reference relabeling).
- The validation split is stratified like the TF reference (shuffle each landmark's images with the
  seed, the first max(1, floor(fraction * n)) go to validation), except that every landmark keeps at
  least one training image (TF moves a single-image landmark wholly to validation).
- Images are stored as their original bytes when Pillow decodes them as an RGB or greyscale JPEG;
  other formats (PNG/GIF behind a .jpg name, CMYK JPEGs) are re-encoded to RGB JPEG (quality 95);
  missing or undecodable files are skipped and counted. Source images are only ever read
  (the MindSpore port deleted each one after converting it).
- Shards are written in a hidden staging directory and moved into place only when complete, so an
  interrupted or failed build never leaves a half-written dataset (or destroys the previous one).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import atomic_write_text, give_umask_permissions

SCHEMA = {"data": {"type": "bytes"}, "label": {"type": "int64"}, "file_id": {"type": "string"}}
TRAIN_PREFIX = "train.mindrecord"
VALIDATION_PREFIX = "validation.mindrecord"
INFO_FILE = "dataset_info.json"
RELABELING_FILE = "relabeling.csv"
SKIPPED_FILE = "skipped_images.csv"
_OUTPUT_NAMES = (INFO_FILE, RELABELING_FILE, SKIPPED_FILE)
_MAX_SHARDS = 1000  # FileWriter's limit
_WRITE_BATCH = 64   # records per write_raw_data call: bounds memory, amortises the call
_REENCODE_QUALITY = 95


def default_num_workers() -> int:
    """Reader processes used when none is given: the cores present, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _open_csv(path: str | os.PathLike, required: tuple[str, ...]):
    """Open a csv file and check its header; returns (file, reader, indices of the required columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: csv file not found")
    handle = path.open(newline="", encoding="utf-8")
    reader = csv.reader(handle)
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
        handle.close()
        raise InputError(f"{path}: missing column {missing[0]!r} (header is {','.join(header) or 'empty'})")
    return handle, reader, [header.index(name) for name in required]


def _parse_landmark(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path} line {line}: landmark_id {value!r} is not an integer") from None


def _check_ids(ids: np.ndarray, path: str | os.PathLike) -> None:
    # Ids become path components (a/b/c/abc....jpg): only letters and digits can be trusted there.
    bad = ~np.char.isalnum(ids) | (np.char.str_len(ids) < 3) if len(ids) else np.zeros(0, bool)
    if bad.any():
        raise InputError(f"{path}: image id {ids[bad][0]!r} is not an id of 3 or more letters/digits")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{path}: image id {unique[counts > 1][0]!r} is listed more than once")


def read_train_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read train.csv (id,url,landmark_id); returns (ids, landmark ids as int64)."""
    handle, reader, (id_col, label_col) = _open_csv(path, ("id", "landmark_id"))
    ids, labels = [], []
    with handle:
        for row in reader:
            if not row:
                continue
            ids.append(row[id_col])
            labels.append(_parse_landmark(row[label_col], Path(path), reader.line_num))
    ids_array = np.array(ids, dtype=str)
    _check_ids(ids_array, path)
    return ids_array, np.array(labels, dtype=np.int64)


def read_clean_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read train_clean.csv (landmark_id,images); returns one (id, landmark id) pair per image."""
    handle, reader, (label_col, images_col) = _open_csv(path, ("landmark_id", "images"))
    ids, labels = [], []
    with handle:
        for row in reader:
            if not row:
                continue
            landmark = _parse_landmark(row[label_col], Path(path), reader.line_num)
            row_ids = row[images_col].split()
            ids.extend(row_ids)
            labels.extend([landmark] * len(row_ids))
    ids_array = np.array(ids, dtype=str)
    _check_ids(ids_array, path)
    return ids_array, np.array(labels, dtype=np.int64)


def select_clean(train_ids: np.ndarray, train_labels: np.ndarray, clean_ids: np.ndarray,
                 clean_labels: np.ndarray, clean_csv_path: str | os.PathLike = "train_clean.csv",
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the train.csv rows whose id is in the clean list.

    Returns (ids, landmark ids, clean ids absent from train.csv). A clean id whose landmark differs
    from train.csv means the two files come from different releases: an InputError.
    """
    order = np.argsort(train_ids)
    sorted_ids = train_ids[order]
    position = np.minimum(np.searchsorted(sorted_ids, clean_ids), max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[position] == clean_ids) if len(sorted_ids) else np.zeros(len(clean_ids), bool)
    train_rows = order[position[found]]
    conflict = np.flatnonzero(train_labels[train_rows] != clean_labels[found])
    if conflict.size:
        image = clean_ids[found][conflict[0]]
        raise InputError(
            f"{clean_csv_path}: image {image} has landmark {clean_labels[found][conflict[0]]} but "
            f"{train_labels[train_rows][conflict[0]]} in train.csv (are both files from the same release?)")
    return train_ids[train_rows], train_labels[train_rows], clean_ids[~found]


def image_path(train_directory: str | os.PathLike, file_id: str) -> str:
    """Where GLDv2 keeps an image: <dir>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg."""
    return os.path.join(train_directory, file_id[0], file_id[1], file_id[2], f"{file_id}.jpg")


def relabel(landmark_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber landmarks 0..C-1 in sorted order; returns (new labels, old landmark id per new label)."""
    old_for_new, new_labels = np.unique(landmark_ids, return_inverse=True)
    return new_labels.astype(np.int64), old_for_new


def split_train_validation(labels: np.ndarray, validation_split_size: float, seed: int) -> np.ndarray:
    """Stratified split; returns a boolean mask, True for validation images.

    Each class's images are shuffled with the seed and its first max(1, floor(fraction * n)) go to
    validation, capped at n - 1 so that every class keeps a training image.
    """
    if not 0.0 <= validation_split_size < 1.0:
        raise InputError(f"validation_split_size: {validation_split_size} is not in [0, 1)")
    is_validation = np.zeros(len(labels), dtype=bool)
    if validation_split_size == 0.0 or len(labels) == 0:
        return is_validation
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]  # by class, random within class
    counts = np.bincount(labels)
    class_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank_in_class = np.arange(len(labels)) - class_start[labels[grouped]]
    cutoff = np.minimum(np.maximum(1, np.floor(validation_split_size * counts)), counts - 1)
    is_validation[grouped] = rank_in_class < cutoff[labels[grouped]]
    return is_validation


def load_image_bytes(path: str) -> tuple[str, bytes | None]:
    """Read one image for storage; returns (status, JPEG bytes or None).

    status: "ok" (original bytes), "reencoded" (converted to an RGB JPEG), "missing", "corrupt".
    The file is only read, never modified.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return "missing", None
    except OSError:
        return "corrupt", None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: verify() alone lets truncated JPEGs through
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return "ok", data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=_REENCODE_QUALITY)
            return "reencoded", buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt", None


def _existing_outputs(directory: Path) -> list[Path]:
    found = [directory / name for name in _OUTPUT_NAMES if (directory / name).exists()]
    for prefix in (TRAIN_PREFIX, VALIDATION_PREFIX):
        found.extend(sorted(directory.glob(prefix + "*")))
    return found


def _map(pool, function, items, chunksize: int):
    return pool.imap(function, items, chunksize=chunksize) if pool is not None else map(function, items)


def _write_split(pool, staging: Path, prefix: str, paths: list[str], file_ids: np.ndarray,
                 labels: np.ndarray, num_shards: int, skipped: list[tuple[str, str]]) -> dict:
    """Write one split's shards into `staging`; returns its counts."""
    from mindspore.mindrecord import FileWriter  # heavy import, kept out of the reader processes

    shard_count = min(num_shards, max(1, len(paths)))
    writer = FileWriter(str(staging / prefix), shard_num=shard_count)
    writer.add_schema(SCHEMA, "GLDv2")
    writer.add_index(["file_id", "label"])
    statuses: Counter = Counter()
    written_labels = []
    batch = []
    results = _map(pool, load_image_bytes, paths, chunksize=16)
    for index, (status, data) in enumerate(tqdm(results, total=len(paths), desc=prefix, unit="img")):
        statuses[status] += 1
        if data is None:
            skipped.append((str(file_ids[index]), status))
            continue
        batch.append({"data": data, "label": int(labels[index]), "file_id": str(file_ids[index])})
        written_labels.append(labels[index])
        if len(batch) == _WRITE_BATCH:
            writer.write_raw_data(batch)
            batch = []
    if batch:
        writer.write_raw_data(batch)
    writer.commit()
    # FileWriter pads the shard number to the width of shard_count - 1 (none for a single shard).
    first_shard = min(path.name for path in staging.glob(prefix + "*") if path.suffix != ".db")
    return {"count": len(written_labels), "shards": shard_count, "first_shard": first_shard,
            "labels": np.asarray(written_labels, dtype=np.int64), "statuses": statuses}


def build_image_dataset(train_csv_path: str | os.PathLike, train_clean_csv_path: str | os.PathLike | None,
                        train_directory: str | os.PathLike, output_directory: str | os.PathLike,
                        num_shards: int = 128, validation_split_size: float = 0.2, seed: int = 0,
                        num_workers: int | None = None, overwrite: bool = False) -> dict:
    """Write the GLDv2 (clean) train/validation MindRecord shards; returns a report dict.

    train_clean_csv_path None keeps every image of train.csv. num_workers 0 reads images in this
    process. Missing and corrupt images are skipped and counted in the report, not fatal.
    """
    if not 1 <= num_shards <= _MAX_SHARDS:
        raise InputError(f"num_shards: {num_shards} is not in 1..{_MAX_SHARDS}")
    if not 0.0 <= validation_split_size < 1.0:
        raise InputError(f"validation_split_size: {validation_split_size} is not in [0, 1)")
    num_workers = default_num_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise InputError(f"num_workers: {num_workers} is negative")
    train_directory = Path(train_directory)
    if not train_directory.is_dir():
        raise InputError(f"train_directory {train_directory}: no such directory")
    if not any(train_directory.iterdir()):
        raise InputError(f"train_directory {train_directory}: the directory is empty")
    output_directory = Path(output_directory)
    previous = _existing_outputs(output_directory) if output_directory.is_dir() else []
    if previous and not overwrite:
        raise InputError(f"output_directory {output_directory} already holds a built dataset "
                         f"({previous[0].name}); pass --overwrite to replace it")

    ids, landmarks = read_train_csv(train_csv_path)
    not_in_train_csv = np.array([], dtype=str)
    if train_clean_csv_path is not None:
        clean_ids, clean_landmarks = read_clean_csv(train_clean_csv_path)
        ids, landmarks, not_in_train_csv = select_clean(ids, landmarks, clean_ids, clean_landmarks,
                                                        train_clean_csv_path)
    if len(ids) == 0:
        raise InputError(f"{train_clean_csv_path or train_csv_path}: no images listed")

    output_directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build_image_dataset-", dir=output_directory))
    try:
        context = multiprocessing.get_context("spawn")  # never fork a process holding MindSpore threads
        pool = context.Pool(num_workers) if num_workers > 0 else None
        try:
            splits, old_for_new, skipped = _read_and_write(pool, staging, ids, landmarks, not_in_train_csv,
                                                           train_directory, num_shards,
                                                           validation_split_size, seed)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        return _finish(staging, output_directory, previous, splits, old_for_new, skipped,
                       validation_split_size, seed, train_csv_path, train_clean_csv_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_and_write(pool, staging: Path, ids: np.ndarray, landmarks: np.ndarray, not_in_train_csv: np.ndarray,
                    train_directory: Path, num_shards: int, validation_split_size: float, seed: int):
    """Drop absent images, relabel, split, and write both splits into `staging`."""
    paths = [image_path(train_directory, file_id) for file_id in ids]
    exists = np.fromiter(tqdm(_map(pool, os.path.isfile, paths, chunksize=256), total=len(paths),
                              desc="checking files", unit="img"), dtype=bool, count=len(paths))
    if not exists.any():
        raise InputError(f"train_directory {train_directory}: none of the {len(ids)} listed images "
                         f"exists (expected e.g. {paths[0]})")
    skipped = [(str(file_id), "missing") for file_id in ids[~exists]]
    skipped += [(str(file_id), "not_in_train_csv") for file_id in not_in_train_csv]
    ids, landmarks = ids[exists], landmarks[exists]
    paths = [path for path, present in zip(paths, exists, strict=True) if present]
    labels, old_for_new = relabel(landmarks)
    is_validation = split_train_validation(labels, validation_split_size, seed)

    rng = np.random.default_rng(seed + 1)  # shuffled write order, so that every shard mixes all classes
    splits = {}
    for prefix, mask in ((TRAIN_PREFIX, ~is_validation), (VALIDATION_PREFIX, is_validation)):
        rows = rng.permutation(np.flatnonzero(mask))
        if rows.size:
            splits[prefix] = _write_split(pool, staging, prefix, [paths[i] for i in rows], ids[rows],
                                          labels[rows], num_shards, skipped)
    return splits, old_for_new, skipped


def _finish(staging: Path, output_directory: Path, previous: list[Path], splits: dict,
            old_for_new: np.ndarray, skipped: list[tuple[str, str]], validation_split_size: float,
            seed: int, train_csv_path, train_clean_csv_path) -> dict:
    """Write the small files, then swap the staged dataset in (dataset_info.json last)."""
    train = splits.get(TRAIN_PREFIX)
    if train is None or train["count"] == 0:
        raise InputError(f"no readable training images: {Counter(reason for _, reason in skipped)}")
    validation = splits.get(VALIDATION_PREFIX, {"count": 0, "shards": 0, "first_shard": None,
                                                "labels": np.array([], np.int64), "statuses": Counter()})
    statuses = train["statuses"] + validation["statuses"]
    num_classes = len(old_for_new)
    reasons = Counter(reason for _, reason in skipped)
    report = {
        "num_classes": num_classes,
        "num_train": train["count"],
        "num_validation": validation["count"],
        "num_train_shards": train["shards"],
        "num_validation_shards": validation["shards"],
        "train_pattern": TRAIN_PREFIX + "*",
        "train_first_shard": train["first_shard"],
        "validation_first_shard": validation["first_shard"],
        "num_reencoded": statuses["reencoded"],
        "num_missing": reasons["missing"],
        "num_corrupt": reasons["corrupt"],
        "num_not_in_train_csv": reasons["not_in_train_csv"],
        "classes_without_train_images": int(
            (np.bincount(train["labels"], minlength=num_classes) == 0).sum()),
        "validation_split_size": validation_split_size,
        "seed": seed,
        "train_csv_path": str(train_csv_path),
        "train_clean_csv_path": None if train_clean_csv_path is None else str(train_clean_csv_path),
    }
    relabeling = "new_label,old_label\n" + "".join(
        f"{new},{old}\n" for new, old in enumerate(old_for_new.tolist()))
    (staging / RELABELING_FILE).write_text(relabeling, encoding="utf-8")
    skipped_rows = "".join(f"{file_id},{reason}\n" for file_id, reason in skipped)
    (staging / SKIPPED_FILE).write_text("file_id,reason\n" + skipped_rows, encoding="utf-8")
    for path in previous:
        path.unlink()
    for path in sorted(staging.iterdir()):
        give_umask_permissions(path)  # MindSpore's FileWriter makes its shards 0600
        os.replace(path, output_directory / path.name)
    atomic_write_text(output_directory / INFO_FILE, json.dumps(report, indent=2) + "\n")
    report["output_directory"] = str(output_directory)
    return report


def print_report(report: dict) -> None:
    print(f"wrote {report['num_train']} training and {report['num_validation']} validation images "
          f"of {report['num_classes']} classes to {report['output_directory']} "
          f"({report['num_train_shards']} + {report['num_validation_shards']} shards)")
    print(f"skipped: {report['num_missing']} missing, {report['num_corrupt']} corrupt, "
          f"{report['num_not_in_train_csv']} clean ids absent from train.csv "
          f"(listed in {SKIPPED_FILE}); re-encoded to JPEG: {report['num_reencoded']}")
    if report["classes_without_train_images"]:
        print(f"warning: {report['classes_without_train_images']} classes have no training image")
