"""The test-data registry and its download path, without the internet.

Copies of real registry files are served from a local HTTP server on 127.0.0.1 (a thread that
stops itself after a minute at most) and the registry is pointed at it, as at a mirror laid out
like ../shared/data. The server counts requests, so "the second run uses the cache" is a count.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import fetch_test_data
import pytest
from data_registry import (
    ARCHIVES_DIR,
    DataFile,
    DataRegistryError,
    Source,
    downloads_allowed,
    file_sha256,
    load_registry,
    materialize,
    mirrored,
)

PHOTO = "images/box.png"
GROUND_TRUTH = "oxford5k_gt/all_souls_1_query.txt"
SERVER_LIFETIME_SECONDS = 60.0


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `root` over HTTP on 127.0.0.1; yields the base URL and the list of request paths."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - the name http.server dispatches to
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # Bounded: even if a test hangs, the server shuts itself down.
    watchdog = threading.Timer(SERVER_LIFETIME_SECONDS, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    """A proxy set in the environment must not swallow requests to the local server."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def registry() -> dict[str, DataFile]:
    return {entry.path: entry for entry in load_registry()}


@pytest.fixture
def mirror_root(tmp_path, shared_data) -> Path:
    """A mirror holding copies of two registry files at their registry paths."""
    root = tmp_path / "mirror"
    for path in (PHOTO, GROUND_TRUTH):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / path, root / path)
    return root


@pytest.fixture
def mirror(mirror_root) -> Iterator[tuple[str, list[str]]]:
    with serve(mirror_root) as served:
        yield served


def two_files(registry: dict[str, DataFile], base_url: str) -> list[DataFile]:
    return mirrored([registry[PHOTO], registry[GROUND_TRUTH]], base_url)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the registry itself ----


def test_registry_describes_exactly_the_files_of_the_data_folder(registry, shared_data):
    on_disk = {path.relative_to(shared_data).as_posix() for path in shared_data.rglob("*")
               if path.is_file() and path.name != "README.md" and ARCHIVES_DIR not in path.parts}
    assert set(registry) == on_disk
    for entry in registry.values():
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert (shared_data / entry.path).stat().st_size == entry.size, entry.path
        assert entry.sources and all(source.url.startswith("https://") for source in entry.sources), entry.path
    assert all(source.member for entry in registry.values() if entry.path.startswith("oxford5k_gt/")
               for source in entry.sources)


def test_every_photo_has_a_pinned_source_and_a_fallback(registry):
    """A repository source names a commit or a release tag first (a branch moves), and each photo
    has a second source. The ground truth exists only in its archive on the dataset's site."""
    for entry in registry.values():
        assert "eb42fee2d71449efb0aa5c10549752b5d75384d8" not in str(entry.sources), entry.path  # reported missing
        if entry.path.startswith("oxford5k_gt/"):
            continue
        assert len(entry.sources) >= 2, entry.path
        first = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/([^/]+)/", entry.sources[0].url)
        assert first is None or re.fullmatch(r"[0-9a-f]{40}|\d+\.\d+\.\d+", first.group(1)), entry.sources[0]


def test_ci_means_no_downloads(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not downloads_allowed()
    monkeypatch.delenv("CI")
    assert downloads_allowed()


# ---- where files are looked up ----


def test_download_from_a_mirror_is_checked_and_laid_out_like_shared(registry, mirror, shared_data, tmp_path):
    base_url, requests = mirror
    cache = tmp_path / "cache"
    folder = materialize(two_files(registry, base_url), tmp_path / "no_shared", cache, allow_download=True)
    assert folder == cache
    for path in (PHOTO, GROUND_TRUTH):
        assert (cache / path).read_bytes() == (shared_data / path).read_bytes()
    assert sorted(requests) == [f"/{PHOTO}", f"/{GROUND_TRUTH}"]


def test_second_run_uses_the_cache(registry, mirror, tmp_path):
    base_url, requests = mirror
    files = two_files(registry, base_url)
    materialize(files, None, tmp_path / "cache", allow_download=True)
    assert len(requests) == 2
    materialize(files, None, tmp_path / "cache", allow_download=True)
    assert len(requests) == 2


def test_a_corrupt_download_is_refused_naming_the_file(registry, mirror, mirror_root, tmp_path):
    base_url, _ = mirror
    corrupt(mirror_root / PHOTO)
    with pytest.raises(DataRegistryError, match=f"could not download 1 test files.*{PHOTO}.*hash"):
        materialize(two_files(registry, base_url), None, tmp_path / "cache", allow_download=True)
    assert not (tmp_path / "cache" / PHOTO).exists()  # nothing unchecked is left behind
    assert (tmp_path / "cache" / GROUND_TRUTH).is_file()


def test_a_corrupt_file_in_the_cache_is_an_error_not_a_download(registry, mirror, shared_data, tmp_path):
    base_url, requests = mirror
    cache = tmp_path / "cache"
    for path in (PHOTO, GROUND_TRUTH):
        (cache / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / path, cache / path)
    corrupt(cache / GROUND_TRUTH)
    with pytest.raises(DataRegistryError, match=f"^{GROUND_TRUTH}: .* has sha256 .*registry says"):
        materialize(two_files(registry, base_url), None, cache, allow_download=True)
    assert requests == []


def test_a_corrupt_file_in_shared_is_an_error(registry, mirror, shared_data, tmp_path):
    base_url, requests = mirror
    shared = tmp_path / "shared"
    (shared / "images").mkdir(parents=True)
    shutil.copyfile(shared_data / PHOTO, shared / PHOTO)
    corrupt(shared / PHOTO)
    with pytest.raises(DataRegistryError, match=f"^{PHOTO}: {shared / PHOTO} has sha256"):
        materialize(two_files(registry, base_url), shared, tmp_path / "cache", allow_download=True)
    assert requests == []


def test_a_complete_shared_folder_is_used_as_it_is(registry, mirror, mirror_root, tmp_path):
    base_url, requests = mirror
    cache = tmp_path / "cache"
    assert materialize(two_files(registry, base_url), mirror_root, cache, allow_download=True) == mirror_root
    assert requests == [] and not cache.exists()


def test_a_partial_shared_folder_is_completed_in_the_cache(registry, mirror, shared_data, tmp_path):
    base_url, requests = mirror
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    (shared / "images").mkdir(parents=True)
    shutil.copyfile(shared_data / PHOTO, shared / PHOTO)
    assert materialize(two_files(registry, base_url), shared, cache, allow_download=True) == cache
    assert requests == [f"/{GROUND_TRUTH}"]
    assert file_sha256(cache / PHOTO) == registry[PHOTO].sha256


def test_without_downloads_the_missing_files_are_named_in_one_line(registry, mirror, tmp_path):
    base_url, requests = mirror
    with pytest.raises(DataRegistryError) as raised:
        materialize(two_files(registry, base_url), tmp_path / "no_shared", tmp_path / "cache", allow_download=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "CI=true" in message and "2 of 2 files" in message and PHOTO in message and GROUND_TRUTH in message
    assert requests == []


def test_a_cache_that_is_a_file_is_one_line_naming_it(registry, mirror, shared_data, tmp_path):
    """DELF_TEST_DATA naming a file while files must be copied from a partial ../shared/data, or downloaded."""
    base_url, requests = mirror
    shared, cache = tmp_path / "shared", tmp_path / "cache_file"
    (shared / "images").mkdir(parents=True)
    shutil.copyfile(shared_data / PHOTO, shared / PHOTO)
    cache.write_text("not a folder")
    for shared_dir in (shared, None):  # copy from shared, or download
        with pytest.raises(DataRegistryError, match=f"cannot write the test data cache {cache} .*: point "
                                                    "DELF_TEST_DATA to a writable folder") as raised:
            materialize(two_files(registry, base_url), shared_dir, cache, allow_download=True)
        assert "\n" not in str(raised.value)
    assert requests == [] and cache.read_text() == "not a folder"


def test_a_read_only_cache_is_one_line_naming_it(registry, mirror, shared_data, tmp_path, monkeypatch):
    """Read-only storage (emulated: the tests may run as root, whom permissions do not stop)."""
    import data_registry

    base_url, _ = mirror
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    (shared / "images").mkdir(parents=True)
    shutil.copyfile(shared_data / PHOTO, shared / PHOTO)

    def read_only(source, target):
        raise OSError(30, "Read-only file system", str(target))

    monkeypatch.setattr(data_registry.shutil, "copyfile", read_only)
    with pytest.raises(DataRegistryError, match=f"cannot write the test data cache {cache} .*Read-only file system"):
        materialize(two_files(registry, base_url), shared, cache, allow_download=True)


# ---- sources: fallbacks and archive members ----


def test_the_next_source_is_tried_when_one_fails(registry, mirror, tmp_path):
    base_url, requests = mirror
    entry = registry[PHOTO]
    with_fallback = DataFile(entry.path, entry.sha256, entry.size,
                             (Source(f"{base_url}/gone/box.png"), Source(f"{base_url}/{PHOTO}")))
    materialize([with_fallback], None, tmp_path / "cache", allow_download=True)
    assert requests == ["/gone/box.png", f"/{PHOTO}"]
    assert file_sha256(tmp_path / "cache" / PHOTO) == entry.sha256


def write_tgz(archive: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged-member"])
def test_archive_members_are_extracted_checked_and_the_archive_dropped(registry, mirror, mirror_root, tmp_path,
                                                                       damaged):
    base_url, requests = mirror
    entry = registry[GROUND_TRUTH]
    content = (mirror_root / GROUND_TRUTH).read_bytes()
    if damaged:
        content = content.replace(b"all_souls", b"all_Souls", 1)
    write_tgz(mirror_root / "gt.tgz", {"all_souls_1_query.txt": content, "keble_1_query.txt": b"unrelated\n"})
    member = Source(f"{base_url}/gt.tgz", "all_souls_1_query.txt")
    from_archive = DataFile(entry.path, entry.sha256, entry.size, (member,))
    cache = tmp_path / "cache"
    if damaged:
        with pytest.raises(DataRegistryError, match=f"{GROUND_TRUTH} <- .*gt.tgz#all_souls_1_query.txt: sha256"):
            materialize([from_archive], None, cache, allow_download=True)
        assert not (cache / GROUND_TRUTH).exists()
    else:
        materialize([from_archive], None, cache, allow_download=True)
        assert (cache / GROUND_TRUTH).read_bytes() == content
    assert requests == ["/gt.tgz"]
    assert not any((cache / ARCHIVES_DIR).iterdir())  # neither the archive nor its extraction is kept


# ---- the helper script ----


def test_fetch_script_fills_a_folder_from_a_mirror(registry, shared_data, tmp_path, capsys):
    with serve(shared_data) as (base_url, requests):
        assert fetch_test_data.main(["--mirror", base_url, "--dest", str(tmp_path / "data")]) == 0
    assert len(requests) == len(registry)
    assert all(file_sha256(tmp_path / "data" / path) == entry.sha256 for path, entry in registry.items())
    assert f"{len(registry)} test files" in capsys.readouterr().out
