"""The tests' real data: ../shared/data when it is there, else a download cache checked by sha256.

tests/data_registry.txt lists every file the tests read with its sha256, size and public
sources. `ensure_test_data()` returns a folder laid out like ../shared/data:

1. ../shared/data itself when it holds every file (our CI);
2. otherwise the cache (`$DELF_TEST_DATA`, else pooch's per-user cache folder), where each file
   is taken from ../shared/data if it is there and downloaded otherwise.

Every file is checked against its sha256 wherever it comes from, and a mismatch is an error
naming the file. With CI=true nothing is downloaded: CI must have the data beside the project,
and a missing file is reported, not fetched.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pooch

REGISTRY_FILE = Path(__file__).resolve().with_name("data_registry.txt")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE_ENV = "DELF_TEST_DATA"
ARCHIVES_DIR = ".archives"  # inside the cache: downloaded archives, removed once their members are out
DOWNLOAD_TIMEOUT_SECONDS = 60  # per request, so a dead host fails the run instead of hanging it


class DataRegistryError(Exception):
    """Test data is missing, corrupt or could not be downloaded; the message is one line."""


@dataclass(frozen=True)
class Source:
    """Where a file can be downloaded: a URL, or one member of the .tgz archive at `url`."""

    url: str
    member: str | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        url, _, member = text.partition("#")
        return cls(url, member or None)

    def __str__(self) -> str:
        return f"{self.url}#{self.member}" if self.member else self.url


@dataclass(frozen=True)
class DataFile:
    """One file of the test data: its path inside the data folder, checksum, size and sources."""

    path: str
    sha256: str
    size: int
    sources: tuple[Source, ...]


def load_registry(registry_file: Path = REGISTRY_FILE) -> list[DataFile]:
    """Parse the registry (`path sha256 bytes source [source ...]` a line, `#` comments)."""
    files = []
    for number, line in enumerate(registry_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 4:
            raise DataRegistryError(f"{registry_file}:{number}: expected 'path sha256 bytes source ...'")
        path, sha256, size, *sources = fields
        files.append(DataFile(path, sha256.lower(), int(size), tuple(Source.parse(s) for s in sources)))
    return files


def registry_paths(prefix: str = "", registry_file: Path = REGISTRY_FILE) -> list[str]:
    """Sorted registry paths under `prefix`, e.g. "images/sacre_coeur_db/": what the folder holds."""
    return sorted(entry.path for entry in load_registry(registry_file) if entry.path.startswith(prefix))


def mirrored(files: Iterable[DataFile], base_url: str) -> list[DataFile]:
    """The same files, each downloaded from `<base_url>/<path>`: a mirror laid out like ../shared/data."""
    base_url = base_url.rstrip("/")
    return [DataFile(f.path, f.sha256, f.size, (Source(f"{base_url}/{f.path}"),)) for f in files]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$DELF_TEST_DATA if set, else pooch's per-user cache (~/.cache/delf-mindspore on Linux)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path(pooch.os_cache("delf-mindspore"))


def downloads_allowed() -> bool:
    """False in CI (CI=true): CI has ../shared beside the project and must not depend on the internet."""
    return os.environ.get("CI", "").strip().lower() not in ("true", "1")


def _check(path: Path, entry: DataFile) -> None:
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise DataRegistryError(
            f"{entry.path}: {path} has sha256 {actual}, the registry says {entry.sha256} "
            f"(a corrupt or different file: replace or delete it)")


def _name_some(paths: Sequence[str], limit: int = 5) -> str:
    named = ", ".join(paths[:limit])
    return named if len(paths) <= limit else f"{named} and {len(paths) - limit} more"


def materialize(files: Sequence[DataFile], shared_dir: Path | None, cache_dir: Path,
                allow_download: bool) -> Path:
    """A folder holding every file of `files` at its registry path, each checked against its sha256.

    `shared_dir` (None: not consulted) is returned as it is when it holds every file; otherwise the
    files go to `cache_dir` (copied from `shared_dir` where there, else downloaded when
    `allow_download`) and `cache_dir` is returned. Raises DataRegistryError naming the files.
    """
    in_shared: set[str] = set()
    if shared_dir is not None and shared_dir.is_dir():
        for entry in files:
            if (shared_dir / entry.path).is_file():
                _check(shared_dir / entry.path, entry)
                in_shared.add(entry.path)
        if len(in_shared) == len(files):
            return shared_dir

    to_copy, missing = [], []
    for entry in files:
        target = cache_dir / entry.path
        if target.is_file():
            _check(target, entry)
        elif entry.path in in_shared:
            to_copy.append(entry)
        else:
            missing.append(entry)
    if missing and not allow_download:
        looked_in = " and ".join(str(d) for d in (shared_dir, cache_dir) if d is not None)
        raise DataRegistryError(
            f"test data missing, and CI=true downloads nothing: {len(missing)} of {len(files)} files "
            f"({_name_some([entry.path for entry in missing])}) not in {looked_in}")
    try:
        for entry in to_copy:
            (cache_dir / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_dir / entry.path, cache_dir / entry.path)
        if missing:
            cache_dir.mkdir(parents=True, exist_ok=True)  # every download goes below it
            if not os.access(cache_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
    except OSError as error:  # a file where the folder should be, read-only storage, a full disk
        raise DataRegistryError(f"cannot write the test data cache {cache_dir} ({_one_line(error)}): point "
                                f"{CACHE_ENV} to a writable folder") from None
    if missing:
        _download(missing, cache_dir)
    return cache_dir


def _download(files: Sequence[DataFile], cache_dir: Path) -> None:
    """Download `files` into `cache_dir`, trying each file's sources in order; raise if any is left."""
    failures: dict[str, list[str]] = {entry.path: [] for entry in files}
    pending = list(files)
    attempt = 0
    while pending and any(attempt < len(entry.sources) for entry in pending):
        by_archive: dict[str, list[DataFile]] = {}
        for entry in pending:
            if attempt >= len(entry.sources):
                continue
            source = entry.sources[attempt]
            if source.member is None:
                _download_file(entry, source, cache_dir, failures[entry.path])
            else:
                by_archive.setdefault(source.url, []).append(entry)
        for url, members in by_archive.items():
            _download_members(url, members, attempt, cache_dir, failures)
        pending = [entry for entry in pending if not (cache_dir / entry.path).is_file()]
        attempt += 1
    if pending:
        reasons = "; ".join(f"{entry.path} <- {' | '.join(failures[entry.path])}" for entry in pending[:5])
        more = f" (and {len(pending) - 5} more files)" if len(pending) > 5 else ""
        raise DataRegistryError(f"could not download {len(pending)} test files into {cache_dir}: {reasons}{more}")


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _downloader() -> pooch.HTTPDownloader:
    return pooch.HTTPDownloader(progressbar=False, timeout=DOWNLOAD_TIMEOUT_SECONDS)


def _download_file(entry: DataFile, source: Source, cache_dir: Path, failures: list[str]) -> None:
    target = cache_dir / entry.path
    try:
        # pooch downloads to a temporary file and moves it into place only when the hash matches.
        pooch.retrieve(source.url, known_hash=f"sha256:{entry.sha256}", fname=target.name, path=target.parent,
                       downloader=_downloader())
    except Exception as error:  # any failure of one source means: try the next one
        failures.append(f"{source}: {_one_line(error)}")


def _download_members(url: str, entries: Sequence[DataFile], attempt: int, cache_dir: Path,
                      failures: dict[str, list[str]]) -> None:
    """Download the archive at `url` once, extract the members `entries` need, check and keep them."""
    archives = cache_dir / ARCHIVES_DIR
    archive_name = url.rsplit("/", 1)[-1]
    extract_dir = archives / f"{archive_name}.members"
    members = {entry.path: entry.sources[attempt].member for entry in entries}
    try:
        # known_hash=None: the archive's own hash is not pinned (see data_registry.txt); each
        # member is checked against its sha256 below instead.
        pooch.retrieve(url, known_hash=None, fname=archive_name, path=archives, downloader=_downloader(),
                       processor=pooch.Untar(members=sorted(set(members.values())), extract_dir=extract_dir.name))
        for entry in entries:
            source = entry.sources[attempt]
            extracted = extract_dir / members[entry.path]
            if not extracted.is_file():
                failures[entry.path].append(f"{source}: no such member in the archive")
            elif (actual := file_sha256(extracted)) != entry.sha256:
                failures[entry.path].append(f"{source}: sha256 {actual}, the registry says {entry.sha256}")
            else:
                (cache_dir / entry.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(extracted, cache_dir / entry.path)
    except Exception as error:  # any failure of one source means: try the next one
        for entry in entries:
            failures[entry.path].append(f"{entry.sources[attempt]}: {_one_line(error)}")
    finally:
        # The archive is not kept: only its checked members are needed, and the Oxford5k image
        # archive alone is 1.9 GB.
        shutil.rmtree(extract_dir, ignore_errors=True)
        (archives / archive_name).unlink(missing_ok=True)


@functools.cache
def ensure_test_data() -> Path:
    """The test data folder for this run (see the module docstring); DataRegistryError if it cannot be had."""
    return materialize(load_registry(), SHARED_DATA, default_cache_dir(), downloads_allowed())
