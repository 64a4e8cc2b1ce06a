"""Ground truth of Oxford5k / Paris6k and their revisited versions, in revisitop's layout.

The ground truth is a plain dict:

    {"dataset": "roxford5k",
     "imlist": [database image names, no extension],
     "qimlist": [query image names],
     "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...], "junk": [...]}, ...]}

where easy / hard / junk are sorted 0-based indices into imlist. Classic txt files become easy =
good + ok, hard = [], junk = junk. revisitop's pickles are read by a restricted unpickler.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from struct import error as StructError
from typing import Any

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from model_utils.cli import InputError

PROTOCOLS = ("easy", "medium", "hard")
# The Paris6k images that were broken upstream (HTML error pages saved as .jpg; the VGG page's
# corrupt.txt). scripts/download_paris.sh reads this list and moves them aside, out of the database.
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
    except (ValueError, TypeError, OSError, NotImplementedError, MatReadError, EOFError, StructError,
            zlib.error, IndexError, KeyError) as error:
        # A file that is not a MAT file (or a damaged one) makes scipy's parser fail in many ways.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"cannot read {path} as a MATLAB file: {reason}") from None
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


def junk_by_protocol(ground_truth: GroundTruth) -> dict[str, list[np.ndarray]]:
    """Per protocol, each query's junk database indices (skipped when a retrieval shortlist is taken)."""
    return {protocol: [entry["junk"] for entry in protocol_ground_truth(ground_truth["gnd"], protocol)]
            for protocol in PROTOCOLS}
