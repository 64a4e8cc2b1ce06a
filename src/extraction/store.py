"""The HDF5 feature store: DELF local features of an image set, crash-safe and resumable.

`FeatureStore` writes; it reads (every read verified) as its base `store_reader.StoreReader`, which
also describes the layout and how damage is detected. HDF5 files can be corrupted by a process
killed while it has them open for writing, so writers never open the store for writing:

* `put` writes each image as `<store>.h5.journal/<encoded id>.npz`, to a temporary file first and
  then os.replace'd, so a journal entry is either complete or absent. Several processes may put
  into one store at once.
* `compact` (one process at a time, under a lock) writes a NEW HDF5 file beside the store with the
  old groups (copied by HDF5 itself) and the journal entries, os.replace's it over the store, and
  only then deletes the merged journal entries.
* `repair` rewrites a damaged store with its intact images (`python -m src.feature_io repair STORE`).

So a SIGKILL at any instant leaves the last complete store plus complete journal entries, and a
resumed run (`is_done`) redoes only the image that was being written.

A set of store shards (one per msrun rank) is read as one store through
`store_set.open_store`.

CLI: python -m src.feature_io {export,compact,list,repair} STORE ...
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

import h5py
import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import atomic_output, directory_lock, remove_dead_temporaries
from src.extraction.features import LocalFeatures, check_features, encode_features, features_checksum
from src.extraction.store_reader import (
    DAMAGED_SUFFIX,
    LOGGER,
    READ_ERRORS,
    DamagedImageError,
    DamagedStoreError,
    StoredImage,
    StoreReader,
    encode_id,
    is_hdf5,
)

FAILURES_SUFFIX = ".failures.txt"  # the list of images that failed, beside a store (extractor.write_failures)
FORMAT = "delf-features-v2"  # v2: per-image checksums; v1 (no checksums) is still read


class RepairReport(NamedTuple):
    kept: int  # intact images rewritten from the HDF5 file
    damaged: dict[str, str]  # image id -> why it was dropped
    index_damaged: str  # why no image could be listed at all ('' when the index was readable)
    moved_to: Path | None  # where the old file went when anything was lost


class FeatureStore(StoreReader):
    """DELF features of an image set in one HDF5 file plus a journal; usable as a context manager."""

    def __init__(self, path: str | os.PathLike, *, open_now: bool = True) -> None:
        """`open_now=False` defers opening the HDF5 file (so `repair` can handle one that fails to open)."""
        self._written = False
        super().__init__(path, open_now=open_now)

    def put(
        self, image_id: str, features: LocalFeatures, *, image_size: tuple[int, int], settings_hash: str,
        global_descriptor: np.ndarray | None = None, descriptor_dtype: str = "float32",
    ) -> None:
        """Store one image's features atomically (as a journal entry); replaces an older entry.

        `global_descriptor`: the image's (G,) global descriptor (DELG), stored and checksummed
        with it. `descriptor_dtype`: how the local descriptors are stored (float32, float16 or
        int8: features.py); readers get float32 either way.
        """
        stored = encode_features(image_id, check_features(image_id, features), descriptor_dtype, global_descriptor)
        height, width = (int(v) for v in image_size)
        if height <= 0 or width <= 0:
            raise InputError(f"image_size of {image_id!r} must be positive (h, w), got {image_size}")
        if not settings_hash:
            raise InputError(f"settings_hash of {image_id!r} must be a non-empty string")
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(self._journal_path(image_id)) as temporary, open(temporary, "wb") as file:
            np.savez(
                file,
                **stored.arrays(),
                image_id=np.array(image_id),
                image_size=np.array([height, width], dtype=np.int64),
                settings_hash=np.array(settings_hash),
                checksum=np.array(features_checksum(stored, (height, width), settings_hash)),
            )
        self._written = True

    @contextlib.contextmanager
    def _compaction_lock(self) -> Iterator[None]:
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        with directory_lock(self.journal_dir):  # one compaction at a time; puts need no lock
            yield

    def compact(self) -> None:
        """Merge the journal into a new HDF5 file that replaces the store, then drop merged entries.

        A damaged journal entry is left in place (and logged): it stays 'not done' until re-extracted.
        """
        if not self.journal_dir.is_dir():
            return
        with self._compaction_lock():
            remove_dead_temporaries(self.journal_dir, ".")
            remove_dead_temporaries(self.path.parent, f".{self.path.name}.")
            entries = sorted(self.journal_dir.glob("*.npz"))
            if entries:
                with self._no_space_is_one_line(entries):
                    merged = self._write_compacted(entries)
                for path, identity in merged:
                    # A worker may have re-put this image meanwhile; keep that newer entry.
                    with contextlib.suppress(FileNotFoundError):
                        status = os.stat(path)
                        if (status.st_ino, status.st_mtime_ns) == identity:
                            path.unlink()

    @contextlib.contextmanager
    def _no_space_is_one_line(self, entries: list[Path]) -> Iterator[None]:
        """Check for room before compacting, and turn a full disk during it into one InputError.

        Without this, HDF5 failing to write ends in a chained traceback plus 'Exception ignored'
        reports from h5py's object destructors, hiding the ENOSPC.
        """
        def message(detail: str) -> str:
            return (f"no space left on device to compact feature store {self.path} ({detail}); its "
                    f"{len(entries)} journal entries are safe: free space and rerun to resume "
                    f"(or `python -m src.feature_io compact {self.path}`)")

        journal_bytes = sum(path.stat().st_size for path in entries)
        old_bytes = self.path.stat().st_size if self.path.exists() else 0
        # HDF5 chunk and header overhead is a few percent; the old file stays until the new one is whole.
        needed = int((old_bytes + journal_bytes) * 1.1) + 2**20
        free = shutil.disk_usage(self.path.parent).free
        if free < needed:
            raise InputError(message(f"needs about {needed / 2**20:.1f} MB, {free / 2**20:.1f} MB free"))
        silenced = []
        previous_hook = sys.unraisablehook
        sys.unraisablehook = silenced.append  # h5py reports failed destructors this way
        try:
            yield
        except (OSError, RuntimeError) as error:
            text = str(error)
            if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in text \
                    or "No space left" in text:
                raise InputError(message("the disk filled up while writing")) from None
            raise
        finally:
            gc.collect()  # run the destructors while their reports are silenced
            sys.unraisablehook = previous_hook
            for report in silenced:
                LOGGER.debug("during compaction of %s: %s", self.path, report.exc_value)

    def _write_compacted(self, entries: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
        """Write journal `entries` + the other old groups to a new file that replaces the store.

        One pass, one image in memory at a time; an entry that fails verification is not merged
        and the old group of that image (if any) is kept.
        """
        merged: list[tuple[Path, tuple[int, int]]] = []
        old = self._hdf5()
        old_names = self._stored_names()
        show = len(old_names) + len(entries) >= 1000
        # libver v108: object headers carry checksums, so damaged metadata is detected, not misread.
        with atomic_output(self.path) as temporary, h5py.File(temporary, "w", libver=("v108", "latest")) as new:
            new.attrs["format"] = FORMAT
            for path in tqdm(entries, desc="compact: journal", unit="image", disable=not show):
                status = os.stat(path)
                image_id = unquote(path.name[: -len(".npz")])
                try:
                    record = self.stored(image_id)
                except DamagedImageError as error:
                    LOGGER.warning("%s; its journal entry is left unmerged", error)
                    continue
                except InputError as error:
                    raise InputError(f"journal entry {path} vanished during compaction of {self.path}") from error
                _write_group(new, image_id, record)
                merged.append((path, (status.st_ino, status.st_mtime_ns)))
            merged_names = {path.name[: -len(".npz")] for path, _ in merged}
            kept_names = [name for name in old_names if name not in merged_names]
            for name in tqdm(kept_names, desc="compact: copy", unit="image", disable=not show):
                try:
                    old.copy(old[name], new, name=name)  # H5Ocopy: no round trip through NumPy
                except READ_ERRORS as error:
                    # Unreadable, so already lost: dropping it makes it 'not done', redone on resume.
                    LOGGER.warning("%s", self._damaged(unquote(name), "HDF5 group, dropped by compaction", error))
                    with contextlib.suppress(KeyError):
                        del new[name]
        self._hdf5()  # pick up the new file
        return merged

    def repair(self) -> RepairReport:
        """Rewrite the store with its intact images (adding checksums to unverified ones), then compact.

        The old file is moved to `<store>.damaged` when anything in it was lost, so nothing is
        deleted; the lost images are 'not done' and redone by the next extraction run.
        """
        kept, damaged, index_damaged, moved_to = 0, {}, "", None
        if not self.path.exists() and not self.journal_dir.is_dir():  # nothing to repair: create nothing
            raise FileNotFoundError(f"feature store {self.path} not found")
        if self.path.exists() and not is_hdf5(self.path):
            raise InputError(f"{self.path} is not an HDF5 file at all, so nothing in it can be repaired: move it "
                             "aside and rerun the extraction")
        with self._compaction_lock():
            if self.path.exists():
                try:
                    names = self._stored_names()
                except DamagedStoreError as error:
                    names, index_damaged = [], error.reason
                with atomic_output(self.path) as temporary, \
                        h5py.File(temporary, "w", libver=("v108", "latest")) as new:
                    new.attrs["format"] = FORMAT
                    for name in tqdm(names, desc="repair", unit="image", disable=len(names) < 1000):
                        image_id = unquote(name)
                        try:
                            record = self.stored(image_id, journal=False)
                        except DamagedImageError as error:
                            damaged[image_id] = str(error)
                            continue
                        _write_group(new, image_id, record)
                        kept += 1
                    if damaged or index_damaged:
                        moved_to = self.path.with_name(self.path.name + DAMAGED_SUFFIX)
                        os.replace(self.path, moved_to)
                self._hdf5()
        self.compact()
        return RepairReport(kept, damaged, index_damaged, moved_to)

    def close(self) -> None:
        """Compact if this object wrote anything, then release the HDF5 file."""
        try:
            if self._written:
                self.compact()
                self._written = False
        finally:
            super().close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except InputError as error:  # e.g. no room to compact after a full disk: the first error says more
            LOGGER.warning("%s", error)


def _write_group(new: h5py.File, image_id: str, record: StoredImage) -> None:
    """One verified image as a group: fletcher32 datasets, attributes and the checksum."""
    group = new.create_group(encode_id(image_id))
    for name, array in record.arrays.arrays().items():
        # HDF5 checks fletcher32 on every read. One chunk per array: h5py's default splits 1000 x 40
        # descriptors into 16 chunks, each checked and looked up apart (reads measured ~30 % slower).
        group.create_dataset(name, data=array, fletcher32=True, chunks=array.shape if array.size else True)
    group.attrs["image_id"] = image_id
    group.attrs["image_size"] = np.array(record.image_size, dtype=np.int64)
    group.attrs["settings_hash"] = record.settings_hash
    group.attrs["num_features"] = record.features.locations.shape[0]
    group.attrs["checksum"] = features_checksum(record.arrays, record.image_size, record.settings_hash)
