"""Reading one HDF5 feature store, every read verified: `StoreReader`, the read half of `store.FeatureStore`.

Layout: `<store>.h5` holds one group per image (locations, scales, descriptors, attention and the
attributes image_id, image_size, settings_hash, num_features, checksum), named by `encode_id`;
`<store>.h5.journal/<encoded id>.npz` holds each image put since the last compaction (store.py
writes both). Readers see the HDF5 file plus the journal; a journal entry is newer and wins.

Damage (a bad disk, a file overwritten by mistake) is detected, never returned: every image carries a
CRC-32 of its arrays, size and settings (`checksum`, in the journal entry and as a group attribute),
compaction writes the datasets with HDF5's fletcher32 filter and checksummed object headers, and
every read checks the checksum and that all values are finite. A damaged image raises
DamagedImageError naming it, and `is_done` says False so a resumed run re-extracts it. A store
whose HDF5 index is damaged raises DamagedStoreError, which says how to recover: `python -m
src.feature_io repair STORE` keeps every intact image, moves the damaged file aside, and the next
run re-extracts the rest. Stores written before checksums existed ('delf-features-v1') are read as
before (finite values and shapes are still checked); `repair` adds the checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import h5py
import numpy as np

from model_utils.cli import InputError
from src.extraction.features import (
    FIELDS,
    KEYPOINT_FIELDS,
    OPTIONAL_FIELDS,
    Keypoints,
    LocalFeatures,
    StoredFeatures,
    check_global_descriptor,
    check_keypoints,
    check_stored,
    features_checksum,
)

JOURNAL_SUFFIX = ".journal"
DAMAGED_SUFFIX = ".damaged"
LOGGER = logging.getLogger("delf.store")
# What reading a damaged HDF5 object or journal entry can raise (h5py, zipfile, NumPy's .npy parser).
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, EOFError, zipfile.BadZipFile, zlib.error)
# File names are limited to 255 bytes on common file systems; keep room for the temp-file affixes.
_MAX_ENCODED_ID = 200

class StoredImage(NamedTuple):
    features: LocalFeatures  # float32, decoded
    image_size: tuple[int, int]  # (h, w)
    settings_hash: str
    verified: bool  # False for images written before checksums existed
    arrays: StoredFeatures  # as stored (encoded descriptors, global descriptor): what compaction copies

    @property
    def global_descriptor(self) -> np.ndarray | None:
        return self.arrays.global_descriptor



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


def encode_id(image_id: str) -> str:
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



class StoreReader:
    """The images of one feature store (HDF5 file plus journal), read and verified; read-only."""

    def __init__(self, path: str | os.PathLike, *, open_now: bool = True) -> None:
        """`open_now=False` defers opening the HDF5 file (so `repair` can handle one that fails to open)."""
        self.path = Path(path)
        self.journal_dir = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self._h5: h5py.File | None = None
        self._h5_identity: tuple[int, int, int] | None = None
        if open_now and self.path.exists():
            self._hdf5()  # fail early on a file that is not a feature store

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
        if opening and not is_hdf5(self.path):  # a wrong file, or one damaged from its first byte
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
        except READ_ERRORS as error:
            raise self._damaged_store(error) from None

    def _journal_path(self, image_id: str) -> Path:
        return self.journal_dir / (encode_id(image_id) + ".npz")

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
        except READ_ERRORS as error:
            raise self._damaged(image_id, f"journal entry {path.name}", error) from None

    def _group(self, image_id: str) -> h5py.Group | None:
        name = encode_id(image_id)
        h5 = self._hdf5()
        if h5 is None:
            return None
        try:
            if name not in h5:
                return None
        except READ_ERRORS as error:
            raise self._damaged_store(error) from None
        try:
            return h5[name]
        except READ_ERRORS as error:
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
        except READ_ERRORS as error:
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
        Descriptors stored as float16 or int8 are decoded to float32. Datasets without fletcher32 (a
        store rewritten by other tools) are verified by reading the whole image (`get`, its checksum).
        """
        entry = self._read_journal(image_id, KEYPOINT_FIELDS)
        if entry is None:
            entry = self._read_datasets(image_id, KEYPOINT_FIELDS, require_fletcher32=True)
            if entry is None:
                features = self.get(image_id)
                return Keypoints(features.locations, features.descriptors)
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
            entry = self._read_datasets(image_id, ("global_descriptor",), require_fletcher32=True)
            if entry is None:
                entry = {"global_descriptor": self.stored(image_id, journal=False).global_descriptor}
        elif "image_size" not in entry:
            raise self._damaged(image_id, "journal entry", "no image_size")
        if "global_descriptor" not in entry:
            raise NoGlobalDescriptorError(f"image {image_id!r} of feature store {self.path} has no global "
                                          "descriptor (its features were extracted without a DELG global head)")
        try:
            return check_global_descriptor(image_id, entry["global_descriptor"], DamagedImageError, stored=True)
        except DamagedImageError as error:
            raise self._damaged(image_id, "arrays", error) from None

    def _read_datasets(self, image_id: str, names: Sequence[str], require_fletcher32: bool = False
                       ) -> dict[str, np.ndarray] | None:
        """The datasets `names` (those present) of an image's HDF5 group; None when
        `require_fletcher32` and one of them has no fletcher32 (HDF5 would not check its bytes)."""
        group = self._group(image_id)
        if group is None:
            raise self._missing(image_id)
        try:
            datasets = {name: group[name] for name in names if name in group}
            if require_fletcher32 and not all(dataset.fletcher32 for dataset in datasets.values()):
                return None
            return {name: dataset[()] for name, dataset in datasets.items()}
        except READ_ERRORS as error:
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
        except (*READ_ERRORS, IndexError) as error:
            if isinstance(error, InputError):
                raise
            raise self._damaged(image_id, "attributes", error) from None

    def content(self, image_id: str) -> tuple[str, str | None]:
        """(settings_hash, checksum) of one stored image, not verified: the checksum changes whenever
        the features do (None for images stored before checksums existed). Indexes key on it."""
        entry = self._read_journal(image_id, ("settings_hash", "checksum"))
        if entry is None:
            group = self._group(image_id)
            if group is None:
                raise self._missing(image_id)
            entry = group.attrs
        try:
            checksum = entry.get("checksum")
            return str(entry["settings_hash"]), None if checksum is None else str(checksum)
        except READ_ERRORS as error:
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

    def close(self) -> None:
        """Release the HDF5 file."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self._h5_identity = None


def is_hdf5(path: Path) -> bool:
    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False
