"""The HDF5 feature store: DELF local features of an image set, crash-safe and resumable.

Layout: `<store>.h5` holds one group per image (locations, scales, descriptors, attention and the
attributes image_id, image_size, settings_hash, num_features). HDF5 files can be corrupted by a
process killed while it has them open for writing, so writers never open the store for writing:

* `put` writes each image as `<store>.h5.journal/<encoded id>.npz`, to a temporary file first and
  then os.replace'd, so a journal entry is either complete or absent. Several processes may put
  into one store at once.
* Readers see the HDF5 file plus the journal; a journal entry is newer and wins.
* `compact` (one process at a time, under a lock) writes a NEW HDF5 file beside the store with the
  old groups (copied by HDF5 itself) and the journal entries, os.replace's it over the store, and
  only then deletes the merged journal entries.

So a SIGKILL at any instant leaves the last complete store plus complete journal entries, and a
resumed run (`is_done`) redoes only the image that was being written.

A set of store shards (one per msrun rank) is read as one store through
`store_set.open_store`.

Damage (a bad disk, a file overwritten by mistake) is detected, never returned: every image carries a
CRC-32 of its arrays, size and settings (`checksum`, in the journal entry and as a group attribute),
compaction writes the datasets with HDF5's fletcher32 filter and checksummed object headers, and
every read checks the checksum and that all values are finite. A damaged image raises
DamagedImageError naming it, and `is_done` says False so a resumed run re-extracts it. A store
whose HDF5 index is damaged raises DamagedStoreError, which says how to recover: `python -m
src.feature_io repair STORE` keeps every intact image, moves the damaged file aside, and the next
run re-extracts the rest. Stores written before checksums existed ('delf-features-v1') are read as
before (finite values and shapes are still checked); `repair` adds the checksums.

CLI: python -m src.feature_io {export,compact,list,repair} STORE ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import glob
import hashlib
import logging
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import h5py
import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import TEMP_SUFFIX, atomic_output
from src.extraction.features import (
    FIELDS,
    KEYPOINT_FIELDS,
    OPTIONAL_FIELDS,
    Keypoints,
    LocalFeatures,
    StoredFeatures,
    check_features,
    check_global_descriptor,
    check_keypoints,
    check_stored,
    encode_features,
    features_checksum,
)

JOURNAL_SUFFIX = ".journal"
FAILURES_SUFFIX = ".failures.txt"  # the list of images that failed, beside a store (extractor.write_failures)
DAMAGED_SUFFIX = ".damaged"
FORMAT = "delf-features-v2"  # v2: per-image checksums; v1 (no checksums) is still read
LOGGER = logging.getLogger("delf.store")
# What reading a damaged HDF5 object or journal entry can raise (h5py, zipfile, NumPy's .npy parser).
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, EOFError, zipfile.BadZipFile, zlib.error)
# File names are limited to 255 bytes on common file systems; keep room for the temp-file affixes.
_MAX_ENCODED_ID = 200
_TEMP_PATTERN = re.compile(r"\.(\d+)" + re.escape(TEMP_SUFFIX) + "$")


class StoredImage(NamedTuple):
    features: LocalFeatures  # float32, decoded
    image_size: tuple[int, int]  # (h, w)
    settings_hash: str
    verified: bool  # False for images written before checksums existed
    arrays: StoredFeatures  # as stored (encoded descriptors, global descriptor): what compaction copies

    @property
    def global_descriptor(self) -> np.ndarray | None:
        return self.arrays.global_descriptor


class RepairReport(NamedTuple):
    kept: int  # intact images rewritten from the HDF5 file
    damaged: dict[str, str]  # image id -> why it was dropped
    index_damaged: str  # why no image could be listed at all ('' when the index was readable)
    moved_to: Path | None  # where the old file went when anything was lost


class DamagedImageError(InputError):
    """One image of a store is unreadable or fails its checksum; re-extracting it repairs the store."""


class NoGlobalDescriptorError(InputError):
    """The image is stored without a global descriptor (extracted by DELF, not DELG)."""


class DamagedStoreError(InputError):
    """The store's HDF5 index itself is unreadable; `python -m src.feature_io repair` recovers it."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # what went wrong, without the advice


def _repair_hint(path: Path) -> str:
    return (f"run `python -m src.feature_io repair {path}` to keep its intact images (the damaged file is "
            f"moved to {path.name}{DAMAGED_SUFFIX}), then rerun the extraction to redo the rest")


def _encode_id(image_id: str) -> str:
    """A file- and HDF5-safe name for an image id: percent-encoding, with '.' encoded too."""
    if not isinstance(image_id, str) or not image_id or "\0" in image_id:
        raise InputError(f"image id must be a non-empty string without NUL characters, got {image_id!r}")
    encoded = quote(image_id, safe="").replace(".", "%2E")
    if len(encoded) > _MAX_ENCODED_ID:
        raise InputError(
            f"image id {image_id!r} is too long to store ({len(encoded)} characters encoded, "
            f"at most {_MAX_ENCODED_ID})"
        )
    return encoded


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temporaries(directory: Path, prefix: str) -> None:
    """Delete temp files left by processes that no longer run (killed mid-write)."""
    for path in directory.glob(f"{glob.escape(prefix)}*.tmp"):
        match = _TEMP_PATTERN.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_is_running(int(match.group(1))):
            path.unlink(missing_ok=True)


class FeatureStore:
    """DELF features of an image set in one HDF5 file plus a journal; usable as a context manager."""

    def __init__(self, path: str | os.PathLike, *, open_now: bool = True) -> None:
        """`open_now=False` defers opening the HDF5 file (so `repair` can handle one that fails to open)."""
        self.path = Path(path)
        self.journal_dir = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self._h5: h5py.File | None = None
        self._h5_identity: tuple[int, int, int] | None = None
        self._written = False
        if open_now and self.path.exists():
            self._hdf5()  # fail early on a file that is not a feature store

    # -- reading -----------------------------------------------------------------------------

    def _hdf5(self) -> h5py.File | None:
        """The store's HDF5 file, reopened when a compaction has replaced it; None if absent."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            identity = None
        else:
            identity = (status.st_dev, status.st_ino, status.st_mtime_ns)
        if identity != self._h5_identity or (identity is not None and self._h5 is None):
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
            # Identity is taken before opening: a replacement in between only costs a spare reopen.
            self._h5_identity = identity
            if identity is not None:
                try:
                    self._h5 = h5py.File(self.path, "r")
                except OSError as error:
                    self._h5_identity = None
                    raise self._damaged_store(error, opening=True) from None
        return self._h5

    def _damaged_store(self, error: BaseException, opening: bool = False) -> DamagedStoreError:
        reason = " ".join(str(error).split()) or type(error).__name__
        if opening and not _is_hdf5(self.path):  # a wrong file, or one damaged from its first byte
            reason = f"{self.path} is not a readable HDF5 feature store ({reason})"
            return DamagedStoreError(f"{reason}; if it was one, it is damaged beyond repair: move it aside and "
                                     "rerun the extraction", reason)
        what = "is not a readable HDF5 feature store" if opening else "has a damaged index"
        reason = f"{self.path} {what} ({reason})"
        return DamagedStoreError(f"{reason}; {_repair_hint(self.path)}", reason)

    def _stored_names(self) -> list[str]:
        """Encoded names of the images in the HDF5 file; DamagedStoreError when its index is unreadable."""
        h5 = self._hdf5()
        if h5 is None:
            return []
        try:
            return list(h5.keys())
        except _READ_ERRORS as error:
            raise self._damaged_store(error) from None

    def _journal_path(self, image_id: str) -> Path:
        return self.journal_dir / (_encode_id(image_id) + ".npz")

    def _damaged(self, image_id: str, where: str, reason: object) -> DamagedImageError:
        reason = " ".join(str(reason).split()) or type(reason).__name__
        return DamagedImageError(f"image {image_id!r} of feature store {self.path} is damaged ({where}: {reason}); "
                                 "rerun the extraction to redo it")

    def _read_journal(self, image_id: str, keys: Sequence[str]) -> dict | None:
        """Arrays `keys` (those present) of the journal entry of `image_id`, or None if there is none."""
        path = self._journal_path(image_id)
        try:
            # An .npz is a zip archive: only the members asked for are read (each checked by its CRC).
            with np.load(path, allow_pickle=False) as entry:
                return {key: entry[key] for key in keys if key in entry.files}
        except FileNotFoundError:
            return None
        except _READ_ERRORS as error:
            raise self._damaged(image_id, f"journal entry {path.name}", error) from None

    def _group(self, image_id: str) -> h5py.Group | None:
        name = _encode_id(image_id)
        h5 = self._hdf5()
        if h5 is None:
            return None
        try:
            if name not in h5:
                return None
        except _READ_ERRORS as error:
            raise self._damaged_store(error) from None
        try:
            return h5[name]
        except _READ_ERRORS as error:
            raise self._damaged(image_id, "HDF5 group", error) from None

    def _missing(self, image_id: str) -> InputError:
        where = f"feature store {self.path}" + ("" if self.path.exists() else " (which does not exist yet)")
        return InputError(f"no features for image {image_id!r} in {where}")

    def _read_record(self, image_id: str, journal: bool = True) -> dict:
        """The raw arrays and attributes of one image (journal first, unless `journal` is False), unverified."""
        # The journal first: compaction replaces the HDF5 file before deleting journal entries.
        entry = self._read_journal(image_id, (*FIELDS, *OPTIONAL_FIELDS, "image_size", "settings_hash", "checksum")
                                   ) if journal else None
        if entry is not None:
            missing = [key for key in (*FIELDS, "image_size", "settings_hash") if key not in entry]
            if missing:
                raise self._damaged(image_id, "journal entry", f"no {', '.join(missing)}")
            entry["settings_hash"] = str(entry["settings_hash"])
            entry["checksum"] = str(entry["checksum"]) if "checksum" in entry else None
            return entry
        group = self._group(image_id)
        if group is None:
            raise self._missing(image_id)
        try:
            attrs = group.attrs
            names = [*FIELDS, *(name for name in OPTIONAL_FIELDS if name in group)]
            record = {name: group[name][()] for name in names}  # fletcher32 is checked here
            record["image_size"] = np.asarray(attrs["image_size"])
            record["settings_hash"] = str(attrs["settings_hash"])
            record["checksum"] = str(attrs["checksum"]) if "checksum" in attrs else None
        except _READ_ERRORS as error:
            raise self._damaged(image_id, "HDF5 group", error) from None
        return record

    def stored(self, image_id: str, journal: bool = True) -> StoredImage:
        """One image's features and attributes, verified (checksum, shapes, finite values).

        InputError if it is not stored; DamagedImageError if it is damaged. `journal=False` reads
        the HDF5 group even when a newer journal entry exists.
        """
        record = self._read_record(image_id, journal)
        size = np.asarray(record["image_size"]).ravel()
        if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or (size <= 0).any():
            raise self._damaged(image_id, "attributes", f"image_size {size.tolist()}")
        image_size = (int(size[0]), int(size[1]))
        raw = StoredFeatures(*(np.asarray(record[name]) if name in record else None
                               for name in StoredFeatures._fields))
        if record["checksum"] is not None and record["checksum"] != features_checksum(
                raw, image_size, record["settings_hash"]):
            raise self._damaged(image_id, "checksum", "the stored data does not match its checksum")
        try:
            features = check_stored(image_id, raw, DamagedImageError)
        except DamagedImageError as error:
            raise self._damaged(image_id, "arrays", error) from None
        return StoredImage(features, image_size, record["settings_hash"], record["checksum"] is not None, raw)

    def get(self, image_id: str) -> LocalFeatures:
        """The stored features of one image, verified; InputError if it is not stored or damaged."""
        return self.stored(image_id).features

    def keypoints(self, image_id: str) -> Keypoints:
        """Locations and descriptors of one image, read alone: the per-image read of re-ranking.

        About half the cost of `get` (two of the four arrays, no CRC-32 over all of them). Reading
        still detects damage: HDF5 checks each dataset's fletcher32 and the journal's zip archive
        each member's CRC; types and shapes are checked here and finite values by the matcher.
        Descriptors stored as float16 or int8 are decoded to float32.
        """
        entry = self._read_journal(image_id, KEYPOINT_FIELDS)
        if entry is None:
            entry = self._read_datasets(image_id, KEYPOINT_FIELDS)
        if "locations" not in entry or "descriptors" not in entry:
            raise self._damaged(image_id, "journal entry", "no locations or descriptors")
        keypoints = check_keypoints(entry["locations"], entry["descriptors"], entry.get("descriptor_scales"))
        if isinstance(keypoints, str):
            raise self._damaged(image_id, "arrays", keypoints)
        return keypoints

    def global_descriptor(self, image_id: str) -> np.ndarray:
        """The global descriptor of one image, (G,) float32 as stored, read alone.

        NoGlobalDescriptorError (an InputError) when the image has none; DamagedImageError when it
        is damaged: HDF5's fletcher32 or the journal's zip CRC check the bytes read, then type,
        shape and finite values are checked. A dataset without fletcher32 (a store rewritten by
        other tools) is verified by reading the whole image (`stored`, its checksum).
        """
        entry = self._read_journal(image_id, ("global_descriptor", "image_size"))
        if entry is None:
            group = self._group(image_id)
            if group is None:
                raise self._missing(image_id)
            try:
                dataset = group.get("global_descriptor")
                if dataset is not None and not dataset.fletcher32:
                    entry = {"global_descriptor": self.stored(image_id, journal=False).global_descriptor}
                else:
                    entry = {} if dataset is None else {"global_descriptor": dataset[()]}
            except _READ_ERRORS as error:
                raise self._damaged(image_id, "HDF5 group", error) from None
        elif "image_size" not in entry:
            raise self._damaged(image_id, "journal entry", "no image_size")
        if "global_descriptor" not in entry:
            raise NoGlobalDescriptorError(f"image {image_id!r} of feature store {self.path} has no global "
                                          "descriptor (its features were extracted without a DELG global head)")
        try:
            return check_global_descriptor(image_id, entry["global_descriptor"], DamagedImageError, stored=True)
        except DamagedImageError as error:
            raise self._damaged(image_id, "arrays", error) from None

    def _read_datasets(self, image_id: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The datasets `names` (those present) of an image's HDF5 group."""
        group = self._group(image_id)
        if group is None:
            raise self._missing(image_id)
        try:
            return {name: group[name][()] for name in names if name in group}
        except _READ_ERRORS as error:
            raise self._damaged(image_id, "HDF5 group", error) from None

    def attributes(self, image_id: str) -> dict:
        """image_size (h, w), settings_hash and num_features of one stored image (not verified)."""
        entry = self._read_journal(image_id, ("image_size", "settings_hash", "scales"))
        try:
            if entry is not None:
                size, settings_hash, count = entry["image_size"], entry["settings_hash"], entry["scales"].shape[0]
            else:
                group = self._group(image_id)
                if group is None:
                    raise self._missing(image_id)
                attrs = group.attrs
                size, settings_hash, count = attrs["image_size"], attrs["settings_hash"], attrs["num_features"]
            return {
                "image_size": (int(size[0]), int(size[1])),
                "settings_hash": str(settings_hash),
                "num_features": int(count),
            }
        except (*_READ_ERRORS, IndexError) as error:
            if isinstance(error, InputError):
                raise
            raise self._damaged(image_id, "attributes", error) from None

    def content(self, image_id: str) -> tuple[str, str | None]:
        """(settings_hash, checksum) of one stored image, not verified: the checksum changes whenever
        the features do (None for images stored before checksums existed). Indexes key on it."""
        entry = self._read_journal(image_id, ("settings_hash", "checksum"))
        try:
            if entry is None:
                group = self._group(image_id)
                if group is None:
                    raise self._missing(image_id)
                entry = group.attrs
            checksum = entry.get("checksum")
            return str(entry["settings_hash"]), None if checksum is None else str(checksum)
        except _READ_ERRORS as error:
            raise self._damaged(image_id, "attributes", error) from None

    def is_done(self, image_id: str, settings_hash: str) -> bool:
        """True when the image is stored intact and was extracted with these settings.

        The image is read and verified, so a damaged one is redone by a resumed run (its reason is
        logged). DamagedStoreError when the store's index itself is damaged.
        """
        try:
            return self.stored(image_id).settings_hash == settings_hash
        except DamagedImageError as error:
            LOGGER.warning("%s", error)
            return False
        except DamagedStoreError:
            raise
        except InputError:
            return False

    def state(self) -> str:
        """A token that changes whenever the stored images may have changed: the resolved path,
        the HDF5 file's inode, size and modification time (compaction replaces the file), and a
        digest of every journal entry's name, inode, size and modification time (a put replaces
        its entry). Lets an index built from the store skip re-reading every image's settings."""
        try:
            status = os.stat(self.path)
            hdf5 = f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"
        except FileNotFoundError:
            hdf5 = "-"
        entries = []
        if self.journal_dir.is_dir():
            for entry in os.scandir(self.journal_dir):
                with contextlib.suppress(FileNotFoundError):  # compaction may delete it meanwhile
                    status = entry.stat()
                    entries.append((entry.name, status.st_ino, status.st_size, status.st_mtime_ns))
        journal = hashlib.sha256(repr(sorted(entries)).encode()).hexdigest()[:16]
        return f"{self.path.resolve()}|{hdf5}|{journal}"

    def image_ids(self) -> list[str]:
        """Every stored image id, sorted."""
        names = set()
        if self.journal_dir.is_dir():
            names.update(p.name[: -len(".npz")] for p in self.journal_dir.glob("*.npz"))
        names.update(self._stored_names())
        return sorted(unquote(name) for name in names)

    # -- writing -----------------------------------------------------------------------------

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
        lock = os.open(self.journal_dir, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one compaction at a time; puts need no lock
            yield
        finally:
            os.close(lock)

    def compact(self) -> None:
        """Merge the journal into a new HDF5 file that replaces the store, then drop merged entries.

        A damaged journal entry is left in place (and logged): it stays 'not done' until re-extracted.
        """
        if not self.journal_dir.is_dir():
            return
        with self._compaction_lock():
            _remove_dead_temporaries(self.journal_dir, ".")
            _remove_dead_temporaries(self.path.parent, f".{self.path.name}.")
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
                except _READ_ERRORS as error:
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
        if self.path.exists() and not _is_hdf5(self.path):
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
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
                self._h5_identity = None

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


def _is_hdf5(path: Path) -> bool:
    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def _write_group(new: h5py.File, image_id: str, record: StoredImage) -> None:
    """One verified image as a group: fletcher32 datasets, attributes and the checksum."""
    group = new.create_group(_encode_id(image_id))
    for name, array in record.arrays.arrays().items():
        # HDF5 checks fletcher32 on every read. One chunk per array: h5py's default splits 1000 x 40
        # descriptors into 16 chunks, each checked and looked up apart (reads measured ~30 % slower).
        group.create_dataset(name, data=array, fletcher32=True, chunks=array.shape if array.size else True)
    group.attrs["image_id"] = image_id
    group.attrs["image_size"] = np.array(record.image_size, dtype=np.int64)
    group.attrs["settings_hash"] = record.settings_hash
    group.attrs["num_features"] = record.features.locations.shape[0]
    group.attrs["checksum"] = features_checksum(record.arrays, record.image_size, record.settings_hash)
