"""A feature store, or a set of store shards read as one; exporting a store as .npz files.

Shards: a run split over N ranks (msrun) writes one store per rank, `<stem>.rank<r>-of-<N><suffix>`
(features.h5 -> features.rank0-of-2.h5, ...). `open_store(path)` reads such a set as one store
(read-only), so every reader takes the name of the whole store.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.extraction.features import Keypoints, LocalFeatures
from src.extraction.store import FAILURES_SUFFIX, FORMAT, FeatureStore
from src.extraction.store_reader import JOURNAL_SUFFIX, StoredImage


def _npz_path(output_dir: Path, image_id: str) -> Path:
    target = (output_dir / f"{image_id}.npz").resolve()
    if not target.is_relative_to(output_dir.resolve()):
        raise InputError(f"image id {image_id!r} would be exported outside {output_dir}")
    return target


def require_store(path: str | os.PathLike) -> Path:
    """`path` as a Path, or FileNotFoundError when neither the HDF5 file nor its journal exists."""
    path = Path(path)
    if not path.exists() and not path.with_name(path.name + JOURNAL_SUFFIX).is_dir():
        raise FileNotFoundError(f"feature store {path} not found")
    return path


def export_npz(store_path: str | os.PathLike, output_dir: str | os.PathLike) -> int:
    """Write one `<image_id>.npz` (locations, scales, descriptors, attention, all float32, and
    global_descriptor when the image has one) per stored image (of a store, or of all shards of
    one: see open_store).

    Ids containing '/' become sub-directories. Returns the number of files written.
    """
    output_dir = Path(output_dir)
    with open_store(store_path) as store:  # one store, or the shards of one
        image_ids = store.image_ids()
        for image_id in tqdm(image_ids, desc="export", unit="image"):
            target = _npz_path(output_dir, image_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(target) as temporary, open(temporary, "wb") as file:
                record = store.stored(image_id)
                extra = {} if record.global_descriptor is None else {"global_descriptor": record.global_descriptor}
                np.savez(file, **record.features._asdict(), **extra)
    return len(image_ids)


def shard_path(path: str | os.PathLike, rank: int | str, size: int) -> Path:
    """The store of rank `rank` of `size`: features.h5 -> features.rank0-of-2.h5 (rank '*': a glob)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}-of-{size}{path.suffix}")


def ensure_store(path: str | os.PathLike) -> None:
    """Create an empty store file at `path` when nothing is there (a rank with no images still
    leaves its shard, so the set is seen complete)."""
    path = Path(path)
    if not store_exists(path):
        with atomic_output(path) as temporary, h5py.File(temporary, "w") as new:
            new.attrs["format"] = FORMAT


def store_exists(path: str | os.PathLike) -> bool:
    """True when the HDF5 file of a store or its journal is there."""
    path = Path(path)
    return path.exists() or path.with_name(path.name + JOURNAL_SUFFIX).is_dir()


def find_shards(path: str | os.PathLike) -> dict[int, dict[int, Path]]:
    """{rank count N: {rank: shard path}} of the shards of store `path` that exist (file or journal)."""
    path = Path(path)
    name = re.compile(re.escape(path.stem) + r"\.rank(\d+)-of-(\d+)" + re.escape(path.suffix) + "$")
    found: dict[int, dict[int, Path]] = {}
    for candidate in path.parent.glob(f"{glob.escape(path.stem)}.rank*-of-*"):
        file_name = candidate.name.removesuffix(JOURNAL_SUFFIX)
        match = name.match(file_name)
        if match and int(match.group(1)) < int(match.group(2)):
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = candidate.with_name(file_name)
    return found


class ShardedFeatureStore:
    """Several feature stores (the shards of one run) read as one; read-only.

    Which shard holds an image is looked up once, on first use (an image in two shards is an
    error naming both), so open it after the extraction has finished.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], name: str | os.PathLike) -> None:
        self.path = Path(name)  # names the set in messages
        self.shards = [FeatureStore(path) for path in paths]
        self._owners: dict[str, FeatureStore] | None = None

    def _owner_of(self) -> dict[str, FeatureStore]:
        if self._owners is None:
            owners: dict[str, FeatureStore] = {}
            for shard in self.shards:
                for image_id in shard.image_ids():
                    if image_id in owners:
                        raise InputError(f"image {image_id!r} is in two shards of {self.path}: "
                                         f"{owners[image_id].path} and {shard.path}")
                    owners[image_id] = shard
            self._owners = owners
        return self._owners

    def _shard(self, image_id: str) -> FeatureStore:
        shard = self._owner_of().get(image_id)
        if shard is None:
            raise InputError(f"no features for image {image_id!r} in feature store {self.path} "
                             f"({len(self.shards)} shards)")
        return shard

    def get(self, image_id: str) -> LocalFeatures:
        return self._shard(image_id).get(image_id)

    def keypoints(self, image_id: str) -> Keypoints:
        return self._shard(image_id).keypoints(image_id)

    def state(self) -> str:
        return "\n".join(shard.state() for shard in self.shards)

    def stored(self, image_id: str) -> StoredImage:
        return self._shard(image_id).stored(image_id)

    def global_descriptor(self, image_id: str) -> np.ndarray:
        return self._shard(image_id).global_descriptor(image_id)

    def attributes(self, image_id: str) -> dict:
        return self._shard(image_id).attributes(image_id)

    def content(self, image_id: str) -> tuple[str, str | None]:
        return self._shard(image_id).content(image_id)

    def is_done(self, image_id: str, settings_hash: str) -> bool:
        """As FeatureStore.is_done (the image is read and verified) in the shard that holds it."""
        shard = self._owner_of().get(image_id)
        return shard is not None and shard.is_done(image_id, settings_hash)

    def image_ids(self) -> list[str]:
        return sorted(self._owner_of())

    def compact(self) -> None:
        """Compact every shard (each stays its own file)."""
        for shard in self.shards:
            shard.compact()

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ShardedFeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def complete_shards(path: str | os.PathLike) -> list[Path]:
    """The shards of store `path`, every rank of one run; [] when there are none.

    InputError when shards of runs with different rank counts are mixed or a rank's shard is missing.
    """
    found = find_shards(path)
    if not found:
        return []
    if len(found) > 1:
        raise InputError(f"feature store {path}: shards of runs over {' and '.join(map(str, sorted(found)))} "
                         "ranks are mixed; remove the stale ones")
    (size, ranks), = found.items()
    missing = [rank for rank in range(size) if rank not in ranks]
    if missing:
        raise InputError(f"feature store {path}: {len(missing)} of {size} shards missing, first "
                         f"{shard_path(path, missing[0], size).name}: run rank {missing[0]} of {size}")
    return [ranks[rank] for rank in range(size)]


def open_store(path: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureStore | ShardedFeatureStore:
    """The feature store at `path`, for reading.

    `path` is a store; or the name of a store written in shards (features.h5 when only
    features.rank<r>-of-<N>.h5 exist), whose shards are then read as one; or a glob pattern
    (features.rank*-of-4.h5) or a list of stores read as one. FileNotFoundError when absent.
    """
    if not isinstance(path, (str, os.PathLike)):
        paths = [require_store(p) for p in path]
        if not paths:
            raise InputError("no feature stores given")
        return ShardedFeatureStore(paths, paths[0]) if len(paths) > 1 else FeatureStore(paths[0])
    path = Path(path)
    if any(char in str(path) for char in "*?[") and not store_exists(path):
        candidates = glob.glob(str(path)) + glob.glob(str(path) + JOURNAL_SUFFIX)
        matches = sorted({Path(match.removesuffix(JOURNAL_SUFFIX)) for match in candidates
                          if not match.endswith(FAILURES_SUFFIX)})
        if not matches:
            raise FileNotFoundError(f"no feature store matches {path}")
        return ShardedFeatureStore(matches, path)
    paths = store_paths(path)
    if paths == [path]:
        return FeatureStore(path)
    return ShardedFeatureStore(paths, shard_path(path, "*", len(paths)))


def store_paths(path: str | os.PathLike) -> list[Path]:
    """The stores that make up store `path`: [path] itself, or the shards it was extracted in.

    FileNotFoundError when there are neither; InputError when both exist or the shards are
    incomplete or mixed (complete_shards)."""
    path = Path(path)
    shards = complete_shards(path)
    if store_exists(path):
        if shards:
            raise InputError(f"feature store {path} and shards of it ({shards[0].name}, ...) both exist: "
                             "remove the stale one")
        return [path]
    if not shards:
        raise FileNotFoundError(f"feature store {path} not found")
    return shards
