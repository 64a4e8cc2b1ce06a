"""Index directories whose files are checked: a manifest of checksums, verified on open.

A retrieval index kept beside a feature store (the ASMK inverted file; DELG's global-descriptor
index) is a directory of .npy arrays and JSON documents. `IndexFiles` writes and reads them so
that damage is detected, never returned as a result:

- every file is written atomically (`model_utils.files.atomic_output`), streamed through a
  running CRC-32 (no memory map: a full disk is an ordinary error, never a SIGBUS), and a full
  disk or unwritable storage is one InputError naming the index and what to do;
- the manifest (`index.json`, written last: the commit point) lists every file with its size
  and CRC-32 and carries a CRC-32 of itself, so a damaged key is detected too;
- opening checks every listed file's size, and its content once per file identity: a file whose
  (device, inode, size, mtime_ns, ctime_ns) match those recorded when its CRC-32 was last checked
  (in `verified.json`) is not read again. A write cannot leave all five unchanged (ctime is set by
  the kernel on every change, even when mtime is reset; see verify() for the clock's coarseness),
  and a copy gets a new inode, so a copied index is verified once at its new place, and a new or
  rewritten file on the first open after it was written. On read-only storage the record cannot
  be updated and every open verifies what it does not cover (zlib's CRC-32 runs at ~3.7 GB/s
  here; reading the files from disk is the larger part);
- `load_array` checks each .npy header against the dtype and dimensions the caller expects and
  the file's size against the header, before any data is used.

Any mismatch raises DamagedIndexError: one line naming the file and "delete DIR to rebuild".
Damage below the file system (a disk returning other bytes for an unchanged file) is left to the
disk's own checks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from model_utils.cli import InputError
from model_utils.files import TEMP_SUFFIX, atomic_output, atomic_write_text

LOGGER = logging.getLogger("delf.retrieval")

MANIFEST_FILE = "index.json"
VERIFIED_FILE = "verified.json"
_VERIFIED_FORMAT = "delf-index-verified-v1"
# Coarser than any file system's time stamps (1-10 ms on Linux; 2 s on FAT), see verify().
TIMESTAMP_MARGIN_NS = 2_000_000_000
_READ_CHUNK = 16 << 20
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class DamagedIndexError(InputError):
    """An index file is missing, damaged or inconsistent; deleting the index directory rebuilds it."""


class OutdatedIndexError(InputError):
    """The index was written by another version of this format (its caller may rebuild it)."""


@dataclass(frozen=True)
class FileRecord:
    """What the manifest says of one file."""

    size: int
    crc32: int

    def to_json(self) -> dict:
        return {"bytes": self.size, "crc32": f"{self.crc32:08x}"}

    @classmethod
    def from_json(cls, value: object) -> FileRecord:
        if not isinstance(value, dict) or not isinstance(value.get("bytes"), int) or value["bytes"] < 0:
            raise ValueError(f"bad file record {value!r}")
        return cls(value["bytes"], int(str(value["crc32"]), 16))


class _ChecksummedWriter:
    """A binary file wrapper that counts and CRCs what is written (numpy writes .npy headers to it)."""

    def __init__(self, file) -> None:
        self.file, self.size, self.crc32 = file, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        self.file.write(view)
        self.size += len(view)
        return len(view)


class ArrayWriter:
    """Appends C-order values of one dtype to a .npy file being written."""

    def __init__(self, writer: _ChecksummedWriter, dtype: np.dtype) -> None:
        self._writer, self._dtype, self.count = writer, dtype, 0

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self._dtype)
        if chunk.size:
            self._writer.write(chunk.reshape(-1).view(np.uint8))
        self.count += chunk.size


def _identity(status: os.stat_result) -> list[int]:
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _manifest_checksum(document: dict) -> str:
    body = json.dumps({k: v for k, v in document.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return f"crc32:{zlib.crc32(body.encode('utf-8')):08x}"


def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in chunks."""
    crc = 0
    with open(path, "rb", buffering=0) as file:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buffer = bytearray(_READ_CHUNK)
        view = memoryview(buffer)
        while count := file.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return crc


class IndexFiles:
    """The files of one index directory, written and read through a checked manifest.

    `what` names the index in messages ("ASMK index"); `format` is the manifest's format string.
    Writers must hold the index's own lock; readers need none.
    """

    def __init__(self, directory: str | os.PathLike, what: str, format: str) -> None:
        self.directory = Path(directory)
        self.what, self.format = what, format
        self.records: dict[str, FileRecord] = {}  # of the files written or listed by the manifest read
        self._verified: dict[str, list[int]] | None = None  # name -> identity + crc32 when last checked

    # -- errors -----------------------------------------------------------------------------

    def damaged(self, problem: str) -> DamagedIndexError:
        return DamagedIndexError(f"{self.what} {self.directory} is damaged or inconsistent ({problem}); "
                                 f"delete {self.directory} to rebuild it")

    @contextlib.contextmanager
    def writing(self, name: str = "") -> Iterator[None]:
        """Turn a full disk or unwritable storage while writing into one InputError naming the index."""
        try:
            yield
        except OSError as error:
            where = f"{self.what} {self.directory}" + (f" ({name})" if name else "")
            if error.errno in _NO_ROOM:
                raise InputError(f"no space left on device while writing {where}: free space and rerun "
                                 "(what was committed is kept)") from None
            if error.errno in _NOT_WRITABLE:
                raise InputError(f"cannot write {where}: {error.strerror}") from None
            raise

    def require_room(self, needed: int, doing: str) -> None:
        """InputError before `doing` when the disk has less than `needed` bytes free."""
        free = _free_bytes(self.directory)
        if free < needed:
            raise InputError(f"no space left on device for {doing} in {self.what} {self.directory}: it needs "
                             f"{needed / 2**20:.1f} MB, {free / 2**20:.1f} MB are free; free space and rerun "
                             "(what was committed is kept)")

    # -- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _output(self, name: str) -> Iterator[_ChecksummedWriter]:
        with self.writing(name):
            with atomic_output(self.directory / name) as temporary, open(temporary, "wb") as file:
                writer = _ChecksummedWriter(file)
                yield writer
            self.records[name] = FileRecord(writer.size, writer.crc32)

    @contextlib.contextmanager
    def array_writer(self, name: str, dtype: np.dtype | type, shape: tuple[int, ...]) -> Iterator[ArrayWriter]:
        """Write a .npy file of `shape` from consecutive C-order chunks (`.write(chunk)`), e.g. while
        merging; the file appears (atomically) when the block ends with every value written."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        with self._output(name) as writer:
            np.lib.format.write_array_header_1_0(writer, header)
            array_writer = ArrayWriter(writer, dtype)
            yield array_writer
            if array_writer.count != math.prod(shape):
                raise RuntimeError(f"{name}: {array_writer.count} values written for shape {shape}")

    def write_array(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        with self.array_writer(name, array.dtype, array.shape) as writer:
            writer.write(array)

    def write_json(self, name: str, document: Any) -> None:
        with self._output(name) as writer:
            writer.write(json.dumps(document).encode("utf-8"))

    def commit(self, document: dict, names: Iterable[str]) -> None:
        """Write the manifest (atomically: the commit point) listing `names` (written, or listed by
        the manifest read), then save the verification record."""
        files = {name: self.records[name].to_json() for name in names}
        manifest = {**document, "format": self.format, "files": files}
        manifest["checksum"] = _manifest_checksum(manifest)
        with self.writing(MANIFEST_FILE):
            atomic_write_text(self.directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        self.records = {name: self.records[name] for name in files}
        self._save_verified()

    def clear(self, names: Iterable[str] = ()) -> None:
        """Remove the index's files from its directory (nothing else): the manifest, the verification
        record, the segments (`segment-*`), temporaries and the other files `names`."""
        ours = {MANIFEST_FILE, VERIFIED_FILE, *names}
        for path in self.directory.iterdir():
            if path.name in ours or path.name.startswith("segment-") or \
                    (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)):
                path.unlink()

    def remove_temporaries(self) -> None:
        """Delete temporaries left by killed writers (call with the index's lock held: no live writer)."""
        for path in self.directory.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):  # e.g. read-only storage: they stay, harmless
                path.unlink()

    # -- reading ----------------------------------------------------------------------------

    def read_manifest(self, older_formats: Iterable[str] = ()) -> dict | None:
        """The manifest's document (None if there is no manifest), its checksum checked.

        OutdatedIndexError for a manifest of another format version (one of `older_formats`,
        or any other with a valid checksum); DamagedIndexError for anything else."""
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            if path.exists() or path.is_symlink():
                raise self.damaged(f"{MANIFEST_FILE} is not a file")
            return None
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            raise self.damaged(f"{MANIFEST_FILE} is unreadable: {error}") from None
        if not isinstance(document, dict):
            raise self.damaged(f"{MANIFEST_FILE} is not a JSON object")
        if "checksum" not in document:
            if document.get("format") in older_formats:
                raise OutdatedIndexError(f"{self.what} {self.directory} was written by an older version "
                                         f"({document.get('format')})")
            raise self.damaged(f"{MANIFEST_FILE} has no checksum")
        if document["checksum"] != _manifest_checksum(document):
            raise self.damaged(f"{MANIFEST_FILE} fails its checksum")
        found = str(document.get("format"))
        if found.rsplit("-v", 1)[0] != self.format.rsplit("-v", 1)[0]:  # never clear another kind of index
            raise InputError(f"{self.directory} holds another kind of index ({found}), not the {self.what} "
                             f"({self.format}): give each index a folder of its own")
        if found != self.format:
            raise OutdatedIndexError(f"{self.what} {self.directory} has format {document.get('format')!r}, "
                                     f"this version reads {self.format!r}")
        try:
            self.records = {str(name): FileRecord.from_json(value) for name, value in document["files"].items()}
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise self.damaged(f"{MANIFEST_FILE} has a bad file list ({error})") from None
        return document

    def verify(self) -> set[str]:
        """Check every listed file: its size always, its CRC-32 unless verified.json says this very
        file (same identity) was checked already. Returns the names whose content was checked now
        (callers run their own deeper checks on those)."""
        self._load_verified()
        checked, recorded = set(), False
        for name, record in self.records.items():
            path = self.directory / name
            try:
                status = os.stat(path)  # before reading: a change while reading shows next time
            except FileNotFoundError:
                raise self.damaged(f"{name} is missing") from None
            except OSError as error:
                raise self.damaged(f"{name} is unreadable: {error.strerror}") from None
            if status.st_size != record.size:
                raise self.damaged(f"{name} has {status.st_size} bytes, {record.size} were written")
            if self._verified.get(name) == [*_identity(status), record.crc32]:
                continue
            stated_at = _now_ns()
            try:
                crc = file_crc32(path)
            except OSError as error:
                raise self.damaged(f"{name} is unreadable: {error.strerror}") from None
            if crc != record.crc32:
                raise self.damaged(f"{name} fails its checksum")
            checked.add(name)
            # File times come from a coarse clock: a write within the same tick as the last change
            # would leave them as they are. So a file changed less than TIMESTAMP_MARGIN_NS before
            # it was checked is not recorded, and is checked again by the next open.
            if stated_at - status.st_ctime_ns >= TIMESTAMP_MARGIN_NS:
                self._verified[name] = [*_identity(status), crc]
                recorded = True
        if recorded:
            self._save_verified()
        return checked

    def load_array(self, name: str, dtype: np.dtype | type, ndim: int, mmap: bool = False) -> np.ndarray:
        """A listed .npy file, its header checked against `dtype` and `ndim` and its size against the
        header; memory-mapped read-only when `mmap` (and not empty)."""
        if name not in self.records:
            raise self.damaged(f"{MANIFEST_FILE} does not list {name}")
        path = self.directory / name
        dtype = np.dtype(dtype)
        try:
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran_order, found = read_header(file)
                data_start = file.tell()
                size = os.fstat(file.fileno()).st_size
        except (OSError, ValueError, EOFError) as error:
            raise self.damaged(f"{name} is not a readable .npy file ({error})") from None
        if found != dtype or len(shape) != ndim or fortran_order:
            raise self.damaged(f"{name} holds {'Fortran-order ' if fortran_order else ''}{found} of shape {shape}, "
                               f"expected {ndim}-D {dtype}")
        if data_start + math.prod(shape) * dtype.itemsize != size:
            raise self.damaged(f"{name} has {size} bytes, its header says {shape} {dtype}")
        try:
            if mmap and math.prod(shape):
                # A plain read-only view of the mapping: np.memmap's indexing overhead is per call.
                return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=shape).view(np.ndarray)
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise self.damaged(f"{name} is unreadable ({error})") from None

    def load_json(self, name: str) -> Any:
        if name not in self.records:
            raise self.damaged(f"{MANIFEST_FILE} does not list {name}")
        try:
            return json.loads((self.directory / name).read_bytes())
        except (OSError, ValueError) as error:
            raise self.damaged(f"{name} is unreadable ({error})") from None

    def num_bytes(self) -> int:
        """Size of the index files on disk (the manifest included)."""
        return sum(record.size for record in self.records.values()) + (self.directory / MANIFEST_FILE).stat().st_size

    # -- the verification record ------------------------------------------------------------

    def _load_verified(self) -> None:
        if self._verified is not None:
            return
        self._verified = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):  # absent or damaged: check again
            document = json.loads((self.directory / VERIFIED_FILE).read_bytes())
            if document.get("format") == _VERIFIED_FORMAT:
                self._verified = {str(k): [int(x) for x in v] for k, v in document["files"].items()}

    def _save_verified(self) -> None:
        """Best effort: on read-only storage the record stays in this process."""
        if self._verified is None:
            return
        listed = {name: value for name, value in self._verified.items() if name in self.records}
        text = json.dumps({"format": _VERIFIED_FORMAT, "files": listed})
        try:
            atomic_write_text(self.directory / VERIFIED_FILE, text)
        except OSError as error:
            LOGGER.info("%s %s: cannot record which files were verified (%s); the next open verifies them "
                        "again", self.what, self.directory, error.strerror or error)


def string_list(value: object, length: int | None = None) -> list[str]:
    """`value` (read from a JSON document) when it is a list of strings (of `length`), else ValueError."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value) or \
            (length is not None and len(value) != length):
        raise ValueError("not a list of strings" + (f" of length {length}" if length is not None else ""))
    return value


def read_image_listing(files: IndexFiles, name: str, *per_image: str) -> tuple:
    """(first_image, image_ids, then one list per name in `per_image`) of a segment's
    `<name>.images.json`, each list checked to hold one string per image; one line if not."""
    listing = files.load_json(f"{name}.images.json")
    try:
        first_image = listing["first_image"]
        if not isinstance(first_image, int):
            raise ValueError("first_image is not a number")
        image_ids = string_list(listing["image_ids"])
        return (first_image, image_ids, *(string_list(listing[key], len(image_ids)) for key in per_image))
    except (KeyError, TypeError, ValueError) as error:
        raise files.damaged(f"{name}.images.json has a bad entry ({error})") from None


class _NumberedSegment(Protocol):
    name: str
    first_image: int
    image_ids: list[str]
    checksums: list[str]


class _Numbered(Protocol):
    files: IndexFiles
    segments: list
    image_ids: list[str]
    checksums: list[str]
    number_of: dict[str, int]


def append_numbered(index: _Numbered, segment: _NumberedSegment) -> None:
    """Add a segment's images to an index's numbering (image numbers run on from segment to
    segment: a gap or an overlap means the index is damaged)."""
    if segment.first_image != len(index.image_ids):
        raise index.files.damaged(f"{segment.name} starts at image {segment.first_image}, "
                                  f"expected {len(index.image_ids)}")
    index.segments.append(segment)
    index.number_of.update((image_id, segment.first_image + k) for k, image_id in enumerate(segment.image_ids))
    index.image_ids.extend(segment.image_ids)
    index.checksums.extend(segment.checksums)


class _Index(Protocol):
    files: IndexFiles


_IndexT = TypeVar("_IndexT", bound=_Index)


def open_to_update(open_index: Callable[[Path], _IndexT | None], directory: Path) -> _IndexT | None:
    """For a writer holding the index's lock: `open_index(directory)`, with the temporaries left by
    killed writers removed; None when there is no index, or one of another format version (logged:
    the caller builds a new one)."""
    try:
        index = open_index(directory)
    except OutdatedIndexError as error:
        LOGGER.warning("rebuilding %s", error)
        return None
    if index is not None:
        index.files.remove_temporaries()  # left by a killed writer (the caller holds the lock)
    return index


_HELD_LOCKS: set[Path] = set()


@contextlib.contextmanager
def locked(directory: Path, what: str) -> Iterator[None]:
    """One writer of the index in `directory` at a time (flock on the directory; re-entrant within
    this process); readers need no lock. `what` names the index in errors."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{what} folder {directory} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {what} folder {directory}: {error.strerror}") from None
    key = directory.resolve()
    if key in _HELD_LOCKS:
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(key)
        yield
    finally:
        _HELD_LOCKS.discard(key)
        os.close(handle)


def _now_ns() -> int:
    return time.time_ns()


def _free_bytes(directory: Path) -> int:
    status = os.statvfs(directory)
    return status.f_bavail * status.f_frsize
