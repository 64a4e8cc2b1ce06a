"""Ground truth and retrieval metrics for Oxford5k / Paris6k and their revisited versions.

Everything here works on rankings (database indices) and ground truth only; it knows nothing of
networks or retrievers. The ground truth has revisitop's layout, a plain dict:

    {"dataset": "roxford5k",
     "imlist": [database image names, no extension],
     "qimlist": [query image names],
     "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...], "junk": [...]}, ...]}

where easy / hard / junk are sorted 0-based indices into imlist. The metrics follow revisitop's
python/evaluate.py exactly (trapezoid AP, junk removed from the ranking, queries without
positives left out of the mean).
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from src.errors import InputError, cli_main

PROTOCOLS = ("easy", "medium", "hard")
# mAP.txt lists precision/recall at 10..90 (the MindSpore eval); metrics.json also keeps 1, 5, 10
# (the values papers report), so evaluate() computes the union by default.
TXT_KAPPAS = tuple(range(10, 100, 10))
PAPER_KAPPAS = (1, 5, 10)
DEFAULT_KAPPAS = tuple(sorted(set(TXT_KAPPAS) | set(PAPER_KAPPAS)))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The Paris6k images that were broken upstream (HTML error pages saved as .jpg; the VGG page's
# corrupt.txt). scripts/download_paris.sh moves them aside, so they are not in the database.
PARIS6K_CORRUPT_IMAGES = frozenset(
    "paris_" + name
    for name in (
        "louvre_000136", "louvre_000146", "moulinrouge_000422", "museedorsay_001059",
        "notredame_000188", "pantheon_000284", "pantheon_000960", "pantheon_000974",
        "pompidou_000195", "pompidou_000196", "pompidou_000201", "pompidou_000467",
        "pompidou_000640", "sacrecoeur_000299", "sacrecoeur_000330", "sacrecoeur_000353",
        "triomphe_000662", "triomphe_000833", "triomphe_000863", "triomphe_000867",
    )
)

GroundTruth = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Reading ground truth
# ----------------------------------------------------------------------------------------------


def _index_list(values: Any, num_images: int, what: str, source: str) -> list[int]:
    """Sorted unique 0-based indices, checked against the database size."""
    indices = np.asarray(values).ravel()
    if indices.size == 0:
        return []
    if not np.issubdtype(indices.dtype, np.number) or np.any(indices != np.round(indices)):
        raise InputError(f"{source}: {what} holds non-integer indices")
    indices = np.unique(indices.astype(np.int64))
    if indices[0] < 0 or indices[-1] >= num_images:
        raise InputError(
            f"{source}: {what} holds index {indices[0] if indices[0] < 0 else indices[-1]}, "
            f"outside the database of {num_images} images"
        )
    return indices.tolist()


def _build_ground_truth(
    dataset: str, imlist: Sequence[str], qimlist: Sequence[str], gnd: Sequence[dict], source: str
) -> GroundTruth:
    """Normalise and validate one ground truth (shared by every reader)."""
    imlist = [str(name) for name in imlist]
    qimlist = [str(name) for name in qimlist]
    if len(set(imlist)) != len(imlist):
        raise InputError(f"{source}: the database image list contains duplicate names")
    if len(gnd) != len(qimlist):
        raise InputError(f"{source}: {len(qimlist)} query names but {len(gnd)} ground-truth entries")
    entries = []
    for query_index, raw in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in raw]
        if missing:
            raise InputError(f"{source}: query {query_index} has no {', '.join(missing)} list")
        entry = {
            key: _index_list(raw[key], len(imlist), f"query {query_index} '{key}'", source)
            for key in ("easy", "hard", "junk")
        }
        bbx = raw.get("bbx")
        if bbx is not None:
            bbx = np.asarray(bbx, dtype=np.float64).ravel()
            if bbx.size != 4:
                raise InputError(f"{source}: query {query_index} bbx has {bbx.size} values, expected 4")
            bbx = bbx.tolist()
        entry["bbx"] = bbx
        entries.append(entry)
    return {"dataset": dataset, "imlist": imlist, "qimlist": qimlist, "gnd": entries}


def _read_names(path: Path) -> list[str]:
    """First whitespace-separated token of every non-empty line (duplicates kept; sets come later)."""
    if not path.is_file():
        raise InputError(f"ground-truth file {path} is missing")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_classic_ground_truth(
    gt_dir: str | os.PathLike,
    image_names: Iterable[str] | None = None,
    dataset: str | None = None,
    excluded_names: Iterable[str] | None = None,
) -> GroundTruth:
    """Read the original Oxford5k / Paris6k txt files (`<q>_query.txt`, `_good`, `_ok`, `_junk`).

    easy = good, hard = ok, junk = junk; each list is a set (the real files repeat lines).
    The query image is NOT added to its own positives. imlist is `image_names` sorted (names
    without extension), or the sorted union of every name in the files when None. Queries are
    sorted by query name. `dataset` defaults to oxford5k (`oxc1_` query lines, prefix stripped)
    or paris6k (`paris_` names). A listed name missing from `image_names` is an error unless it
    is in `excluded_names` (default: PARIS6K_CORRUPT_IMAGES for paris6k), which are dropped.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise InputError(f"ground-truth directory {gt_dir} does not exist")
    query_files = sorted(gt_dir.glob("*_query.txt"))
    if not query_files:
        raise InputError(f"{gt_dir} holds no *_query.txt files (expected the Oxford/Paris gt files)")

    queries = []
    for query_file in query_files:
        fields = query_file.read_text().split()
        if len(fields) != 5:
            raise InputError(f"{query_file}: expected '<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
        try:
            bbx = [float(value) for value in fields[1:]]
        except ValueError:
            raise InputError(f"{query_file}: the bounding box {fields[1:]} is not four numbers") from None
        stem = query_file.name[: -len("_query.txt")]
        lists = {
            key: set(_read_names(gt_dir / f"{stem}_{suffix}.txt"))
            for key, suffix in (("easy", "good"), ("hard", "ok"), ("junk", "junk"))
        }
        queries.append((query_file, fields[0], bbx, lists))

    query_images = [image for _, image, _, _ in queries]
    if all(image.startswith("oxc1_") for image in query_images):
        detected = "oxford5k"
        query_images = [image[len("oxc1_") :] for image in query_images]
    elif all(image.startswith("paris_") for image in query_images):
        detected = "paris6k"
    else:
        detected = "custom"
    dataset = dataset or detected

    if image_names is None:
        imlist = sorted(set().union(*(names for _, _, _, lists in queries for names in lists.values())))
    else:
        imlist = sorted(image_names)
    position = {name: index for index, name in enumerate(imlist)}
    if excluded_names is None:
        excluded_names = PARIS6K_CORRUPT_IMAGES if dataset == "paris6k" else ()
    droppable = set(excluded_names) - position.keys()

    gnd = []
    for query_file, _, bbx, lists in queries:
        entry = {"bbx": bbx}
        stem = query_file.name[: -len("_query.txt")]
        for key, suffix in (("easy", "good"), ("hard", "ok"), ("junk", "junk")):
            unknown = sorted(lists[key] - position.keys() - droppable)
            if unknown:
                raise InputError(
                    f"{gt_dir / f'{stem}_{suffix}.txt'} names {len(unknown)} image(s) missing from the "
                    f"database image list, e.g. {unknown[0]}"
                )
            entry[key] = [position[name] for name in lists[key] - droppable]
        gnd.append(entry)
    return _build_ground_truth(dataset, imlist, query_images, gnd, str(gt_dir))


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store numpy's raw bytes as `_codecs.encode(text, "latin1")`;
    # any other codec has no business in a ground-truth file.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_internal(module: str, name: str) -> Any:
    """numpy.core.X / numpy._core.X, whichever this numpy has (1.x vs 2.x spelling)."""
    submodule = module.split(".")[-1]
    for package in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(package + submodule), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


_NUMPY_INTERNALS = {
    (package + submodule, name)
    for package in ("numpy.core.", "numpy._core.")
    for submodule, name in (
        ("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")
    )
}


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_INTERNALS:
            return _numpy_internal(module, name)
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module in ("builtins", "__builtin__") and name == "bytes":  # protocol 2's empty bytes
            return bytes
        raise _RefusedGlobal(f"{module}.{name}")


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _dataset_from_file_name(path: Path) -> str:
    match = re.fullmatch(r"gnd_(.+)", path.stem)
    return match.group(1) if match else path.stem


def _read_pkl(path: Path) -> GroundTruth:
    try:
        with path.open("rb") as file:
            content = _GroundTruthUnpickler(file, encoding="latin1").load()  # latin1: Python 2 numpy data
    except _RefusedGlobal as refused:
        raise InputError(f"refusing to load {path}: it references {refused}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise InputError(f"cannot read {path} as a ground-truth pickle: {error}") from None
    if not isinstance(content, dict) or not {"imlist", "qimlist", "gnd"} <= content.keys():
        raise InputError(f"{path} is not a revisitop ground truth (needs keys imlist, qimlist, gnd)")
    if not isinstance(content["gnd"], list | tuple) or not all(isinstance(e, dict) for e in content["gnd"]):
        raise InputError(f"{path}: 'gnd' must be a list of dicts")
    return _build_ground_truth(
        _dataset_from_file_name(path), content["imlist"], content["qimlist"], content["gnd"], str(path)
    )


def _mat_strings(cell: np.ndarray) -> list[str]:
    # A MATLAB cell array of strings loads as an object array of 1-element string arrays.
    return [str(np.asarray(item).ravel()[0]) for item in np.asarray(cell).ravel()]


def _read_mat(path: Path) -> GroundTruth:
    try:
        content = scipy.io.loadmat(str(path))
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        raise InputError(f"cannot read {path} as a MATLAB file: {error}") from None
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in content]
    if missing:
        raise InputError(f"{path} is not a revisitop ground truth (missing {', '.join(missing)})")
    structs = np.asarray(content["gnd"]).ravel()
    if structs.dtype.names is None:
        raise InputError(f"{path}: 'gnd' is not a struct array")
    gnd = []
    for struct in structs:
        # MATLAB indices are 1-based.
        entry = {
            key: np.asarray(struct[key], dtype=np.float64).ravel() - 1
            for key in ("easy", "hard", "junk")
            if key in structs.dtype.names
        }
        if "bbx" in structs.dtype.names:
            entry["bbx"] = np.asarray(struct["bbx"], dtype=np.float64).ravel()
        gnd.append(entry)
    return _build_ground_truth(
        _dataset_from_file_name(path),
        _mat_strings(content["imlist"]),
        _mat_strings(content["qimlist"]),
        gnd,
        str(path),
    )


def read_revisited_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Read revisitop's `gnd_<dataset>.pkl` (safely: numpy arrays only) or the `.mat` variant.

    The pickle goes through a restricted unpickler that refuses any global other than the few
    numpy needs to rebuild arrays; .mat indices are converted from 1-based to 0-based.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist")
    if path.suffix == ".pkl":
        return _read_pkl(path)
    if path.suffix == ".mat":
        return _read_mat(path)
    raise InputError(f"{path}: expected a .pkl or .mat revisitop ground-truth file")


def load_ground_truth(path: str | os.PathLike, image_names: Iterable[str] | None = None) -> GroundTruth:
    """Ground truth from a directory of Oxford/Paris txt files, a revisitop .pkl, or a .mat.

    `image_names` (names without extension) fixes the database of the txt format; the revisited
    files carry their own image list, so it is ignored for them.
    """
    path = Path(path)
    if path.is_dir():
        return read_classic_ground_truth(path, image_names)
    return read_revisited_ground_truth(path)


def image_names_in(images_dir: str | os.PathLike) -> list[str]:
    """Sorted names (no extension) of the images in a directory, for the txt ground truth."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"image directory {images_dir} does not exist")
    names = sorted(p.stem for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise InputError(f"image directory {images_dir} holds no .jpg/.png images")
    return names


# ----------------------------------------------------------------------------------------------
# Metrics (revisitop python/evaluate.py semantics)
# ----------------------------------------------------------------------------------------------


def protocol_ground_truth(gnd: Sequence[dict], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per-query {'ok', 'junk'} index arrays for revisitop's easy / medium / hard protocol."""
    recipes = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if protocol not in recipes:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    ok_keys, junk_keys = recipes[protocol]

    def union(entry: dict, keys: tuple[str, ...]) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(entry[key], dtype=np.int64).ravel() for key in keys]))

    return [{"ok": union(entry, ok_keys), "junk": union(entry, junk_keys)} for entry in gnd]


def compute_ap(positive_ranks: Sequence[int] | np.ndarray, num_positives: int) -> float:
    """Average precision from the sorted 0-based (junk-free) ranks of the retrieved positives.

    Trapezoid rule of revisitop / the original Oxford compute_ap: each positive contributes
    (precision before it + precision at it) / 2 per recall step of 1 / num_positives.
    """
    ranks = np.asarray(positive_ranks, dtype=np.float64).ravel()
    found_before = np.arange(ranks.size, dtype=np.float64)
    precision_before = np.divide(found_before, ranks, out=np.ones_like(ranks), where=ranks > 0)
    precision_at = (found_before + 1) / (ranks + 1)
    return float(np.sum(precision_before + precision_at) / (2.0 * num_positives))


def _junk_free_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives once the junk images are taken out of the ranking."""
    positive_positions = np.flatnonzero(np.isin(ranking, ok))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    return positive_positions - np.searchsorted(junk_positions, positive_positions)


def _check_kappas(kappas: Iterable[int]) -> np.ndarray:
    kappas = np.asarray(list(kappas), dtype=np.int64)
    if kappas.size and kappas.min() < 1:
        raise InputError(f"precision/recall ranks must be >= 1, got {kappas.tolist()}")
    return kappas


def _check_ranks(ranks: np.ndarray, num_queries: int, num_images: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != num_queries:
        hint = " (transpose it: column i must be the ranking of query i)" if (
            ranks.ndim == 2 and ranks.shape[0] == num_queries
        ) else ""
        raise InputError(
            f"ranks has shape {ranks.shape}; expected (database size, {num_queries} queries){hint}"
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        raise InputError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.size and (ranks.min() < 0 or (num_images is not None and ranks.max() >= num_images)):
        raise InputError(f"ranks holds indices outside the database of {num_images} images")
    sorted_columns = np.sort(ranks, axis=0)
    repeated = np.flatnonzero(np.any(sorted_columns[1:] == sorted_columns[:-1], axis=0))
    if repeated.size:
        raise InputError(f"the ranking of query {repeated[0]} lists a database image twice")
    return ranks


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Iterable[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP exactly as revisitop's evaluate.compute_map.

    ranks: (database size x number of queries) database indices, column i = ranking of query i
    (best first; a truncated ranking is allowed). gnd[i]['ok'] are the positives, gnd[i]['junk']
    (optional) are removed from the ranking before positions are counted. Queries without
    positives get AP NaN and are left out of the means. Precision@k uses revisitop's denominator
    min(position of the last positive, k). Returns (mAP, aps, mean precision@k, per-query
    precision@k of shape (nq, len(kappas))).
    """
    kappas = _check_kappas(kappas)
    ranks = _check_ranks(ranks, len(gnd))
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), kappas.size), np.nan)
    for query, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"]).ravel()
        if ok.size == 0:
            continue
        junk = np.asarray(entry.get("junk", ())).ravel()
        positions = _junk_free_positions(ranks[:, query], ok, junk)
        aps[query] = compute_ap(positions, ok.size)
        if positions.size == 0:  # truncated ranking that misses every positive
            precisions[query] = 0.0
            continue
        positions_1 = positions + 1
        cutoffs = np.minimum(positions_1[-1], kappas)
        precisions[query] = (positions_1[:, None] <= cutoffs[None, :]).sum(axis=0) / cutoffs
    evaluated = ~np.isnan(aps)
    if not evaluated.any():  # revisitop's 0/0: every mean is NaN
        return math.nan, aps, np.full(kappas.size, np.nan), precisions
    return float(aps[evaluated].mean()), aps, precisions[evaluated].mean(axis=0), precisions


def _recall_at(ranks: np.ndarray, gnd: Sequence[dict], kappas: np.ndarray) -> np.ndarray:
    """Per-query recall@k: positives within the first k junk-free ranks / number of positives."""
    recalls = np.full((len(gnd), kappas.size), np.nan)
    for query, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"]).ravel()
        if ok.size == 0:
            continue
        positions_1 = _junk_free_positions(ranks[:, query], ok, np.asarray(entry["junk"]).ravel()) + 1
        recalls[query] = (positions_1[:, None] <= kappas[None, :]).sum(axis=0) / ok.size
    return recalls


def evaluate(
    ranks: np.ndarray | Mapping[str, np.ndarray], ground_truth: GroundTruth, kappas: Iterable[int] = DEFAULT_KAPPAS
) -> dict[str, Any]:
    """mAP, per-query AP, mean precision@k and mean recall@k for the easy, medium and hard protocols.

    `ranks` is one ranking for all protocols, or one per protocol (junk-aware re-ranking differs
    between them). Returns {"dataset", "qimlist", "kappas", "protocols": {protocol: {"mAP", "aps",
    "mP@k", "mR@k", "num_evaluated"}}}; all values are fractions in [0, 1].
    """
    kappas = _check_kappas(kappas)
    protocols = {}
    for protocol in PROTOCOLS:
        protocol_ranks = ranks[protocol] if isinstance(ranks, Mapping) else ranks
        protocol_ranks = _check_ranks(protocol_ranks, len(ground_truth["gnd"]), len(ground_truth["imlist"]))
        gnd = protocol_ground_truth(ground_truth["gnd"], protocol)
        mean_ap, aps, mean_precision, _ = compute_map(protocol_ranks, gnd, kappas)
        evaluated = ~np.isnan(aps)
        recalls = _recall_at(protocol_ranks, gnd, kappas)[evaluated]
        protocols[protocol] = {
            "mAP": mean_ap,
            "aps": aps,
            "mP@k": mean_precision,
            "mR@k": recalls.mean(axis=0) if evaluated.any() else np.full(kappas.size, np.nan),
            "num_evaluated": int(evaluated.sum()),
        }
    return {
        "dataset": ground_truth.get("dataset", "unknown"),
        "qimlist": list(ground_truth["qimlist"]),
        "kappas": kappas.tolist(),
        "protocols": protocols,
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _values_at(results: dict[str, Any], metrics: dict[str, Any], key: str, kappas: Sequence[int]) -> list:
    columns = []
    for k in kappas:
        if k not in results["kappas"]:
            raise InputError(f"the results were not evaluated at k={k} (evaluated: {results['kappas']})")
        columns.append(float(metrics[key][results["kappas"].index(k)]))
    return columns


def format_metrics(results: dict[str, Any], kappas_txt: Iterable[int] = TXT_KAPPAS) -> str:
    """The mAP.txt text: one block per protocol (easy, hard, medium), values x100 to 2 decimals."""
    kappas_txt = [int(k) for k in kappas_txt]
    ranks_text = "[" + " ".join(str(k) for k in kappas_txt) + "]"

    def percent(values: list[float]) -> str:
        return "[" + " ".join(f"{100 * v:.2f}" for v in values) + "]"

    blocks = []
    for protocol in sorted(results["protocols"]):
        metrics = results["protocols"][protocol]
        blocks.append(
            f"{protocol}\n"
            f"  mAP={100 * metrics['mAP']:.2f}\n"
            f"  mP@k{ranks_text} {percent(_values_at(results, metrics, 'mP@k', kappas_txt))}\n"
            f"  mR@k{ranks_text} {percent(_values_at(results, metrics, 'mR@k', kappas_txt))}\n"
        )
    return "".join(blocks)


def write_metrics(
    results: dict[str, Any],
    txt_path: str | os.PathLike,
    json_path: str | os.PathLike,
    kappas_txt: Iterable[int] = TXT_KAPPAS,
) -> None:
    """Write mAP.txt (reference layout) and metrics.json (fractions, incl. mP@1,5,10), atomically."""
    text = format_metrics(results, kappas_txt)

    def finite_or_none(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    protocols = {}
    for protocol, metrics in results["protocols"].items():
        _values_at(results, metrics, "mP@k", PAPER_KAPPAS)  # fails clearly if 1, 5, 10 are missing
        protocols[protocol] = {
            "mAP": finite_or_none(metrics["mAP"]),
            "mP@k": {
                str(k): finite_or_none(v) for k, v in zip(results["kappas"], metrics["mP@k"], strict=True)
            },
            "mR@k": {
                str(k): finite_or_none(v) for k, v in zip(results["kappas"], metrics["mR@k"], strict=True)
            },
            "num_evaluated": metrics["num_evaluated"],
            "ap_per_query": {
                name: finite_or_none(ap) for name, ap in zip(results["qimlist"], metrics["aps"], strict=True)
            },
        }
    document = {"dataset": results["dataset"], "values": "fractions in [0, 1]", "protocols": protocols}
    _atomic_write_text(Path(txt_path), text)
    _atomic_write_text(Path(json_path), json.dumps(document, indent=2) + "\n")


def load_ranks(path: str | os.PathLike) -> np.ndarray:
    """ranks.npy: (database size x number of queries) integer database indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranks file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InputError(f"cannot read {path} as a .npy array: {error}") from None


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Score a retrieval ranking against Oxford/Paris (or revisited) ground truth; "
        "writes mAP.txt and metrics.json."
    )
    parser.add_argument("--ranks_path", required=True,
                        help="ranks.npy, shape (database size, number of queries): column i = "
                        "database indices for query i, best first")
    parser.add_argument("--gt_path", required=True,
                        help="directory of Oxford/Paris *_query/_good/_ok/_junk.txt files, or a "
                        "revisitop gnd_*.pkl / gnd_*.mat")
    parser.add_argument("--images_dir", default=None,
                        help="database images (txt ground truth only): their names, sorted, are the "
                        "database order the ranks refer to (default: every name in the gt files)")
    parser.add_argument("--output_dir", required=True, help="where mAP.txt and metrics.json go")
    args = parser.parse_args(argv)

    image_names = image_names_in(args.images_dir) if args.images_dir else None
    ground_truth = load_ground_truth(args.gt_path, image_names)
    results = evaluate(load_ranks(args.ranks_path), ground_truth)
    output_dir = Path(args.output_dir)
    write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
    print(format_metrics(results), end="")
    return 0


if __name__ == "__main__":
    main()
