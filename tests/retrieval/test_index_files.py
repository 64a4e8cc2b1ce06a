"""Tests for src/retrieval/index_files.py: checked index directories (manifest, verification once
per file identity, header checks, one-line errors for damage and a full disk)."""

from __future__ import annotations

import errno
import json
import shutil
import time

import numpy as np
import pytest

from model_utils.cli import InputError
from src.retrieval import index_files
from src.retrieval.index_files import DamagedIndexError, IndexFiles, OutdatedIndexError

FORMAT = "test-index-v2"


def write_index(directory) -> IndexFiles:
    files = IndexFiles(directory, "test index", FORMAT)
    directory.mkdir(exist_ok=True)
    files.write_array("numbers.npy", np.arange(1000, dtype=np.int64))
    with files.array_writer("table.npy", np.uint8, (300, 5)) as writer:  # written in chunks
        for start in range(0, 300, 128):
            writer.write(np.full((min(128, 300 - start), 5), start // 128, np.uint8))
    files.write_json("listing.json", {"ids": ["a", "b"]})
    files.commit({"size": 1000}, ["numbers.npy", "table.npy", "listing.json"])
    return files


@pytest.fixture()
def counted_reads(monkeypatch) -> list[str]:
    reads = []
    crc = index_files.file_crc32
    monkeypatch.setattr(index_files, "file_crc32", lambda path: reads.append(path.name) or crc(path))
    return reads


def test_round_trip_and_header_checks(tmp_path):
    write_index(tmp_path / "index")
    files = IndexFiles(tmp_path / "index", "test index", FORMAT)
    assert files.read_manifest() == json.loads((tmp_path / "index" / "index.json").read_text())
    assert files.verify() == {"numbers.npy", "table.npy", "listing.json"}
    np.testing.assert_array_equal(files.load_array("numbers.npy", np.int64, 1), np.arange(1000))
    table = files.load_array("table.npy", np.uint8, 2, mmap=True)
    assert table.shape == (300, 5) and not table.flags.writeable and table[200, 0] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "index" / "table.npy", allow_pickle=False), table)
    assert files.load_json("listing.json") == {"ids": ["a", "b"]}
    with pytest.raises(DamagedIndexError, match=r"numbers\.npy holds int64 of shape \(1000,\), expected 1-D int32"):
        files.load_array("numbers.npy", np.int32, 1)
    with pytest.raises(DamagedIndexError, match=r"expected 2-D int64\); delete .*index to rebuild it"):
        files.load_array("numbers.npy", np.int64, 2)
    with pytest.raises(DamagedIndexError, match="does not list other.npy"):
        files.load_array("other.npy", np.int64, 1)
    assert IndexFiles(tmp_path / "nothing", "test index", FORMAT).read_manifest() is None
    with pytest.raises(RuntimeError, match="299 values written for shape"), \
            files.array_writer("short.npy", np.uint8, (300,)) as writer:
        writer.write(np.zeros(299, np.uint8))
    assert not (tmp_path / "index" / "short.npy").exists() and not list((tmp_path / "index").glob(".*"))


def test_content_is_verified_once_per_file_identity(tmp_path, counted_reads, monkeypatch):
    write_index(tmp_path / "index")

    def verify(directory=tmp_path / "index"):
        counted_reads.clear()
        files = IndexFiles(directory, "test index", FORMAT)
        files.read_manifest()
        return files.verify()

    # Just written: within the file-time margin, so not recorded and checked again each time.
    assert len(verify()) == 3 and len(verify()) == 3 and not (tmp_path / "index" / "verified.json").exists()
    monkeypatch.setattr(index_files, "_now_ns", lambda: time.time_ns() + 10**10)  # as if checked 10 s later
    assert len(verify()) == 3 and (tmp_path / "index" / "verified.json").is_file()
    assert verify() == set() and counted_reads == []  # unchanged files are not read again
    shutil.copytree(tmp_path / "index", tmp_path / "copy")  # new inodes: checked once at the new place
    assert len(verify(tmp_path / "copy")) == 3 and verify(tmp_path / "copy") == set()
    time.sleep(0.05)  # a timestamp tick after the files were written (the clock above was only moved)
    (tmp_path / "index" / "listing.json").write_text('{"ids": ["a", "c"]}')  # same size, other content
    with pytest.raises(DamagedIndexError, match=r"listing\.json fails its checksum"):
        verify()
    (tmp_path / "index" / "listing.json").write_text('{"ids": ["a"]}')
    with pytest.raises(DamagedIndexError, match=r"listing\.json has 14 bytes, 19 were written"):
        verify()
    (tmp_path / "index" / "listing.json").unlink()
    with pytest.raises(DamagedIndexError, match=r"listing\.json is missing"):
        verify()


def test_verification_works_when_it_cannot_be_recorded(tmp_path, counted_reads, monkeypatch, caplog):
    write_index(tmp_path / "index")
    monkeypatch.setattr(index_files, "_now_ns", lambda: time.time_ns() + 10**10)

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(index_files, "atomic_write_text", read_only)
    for _ in range(2):
        files = IndexFiles(tmp_path / "index", "test index", FORMAT)
        files.read_manifest()
        with caplog.at_level("INFO", logger="delf.retrieval"):
            assert len(files.verify()) == 3
    assert "cannot record which files were verified (Read-only file system)" in caplog.text


def test_manifest_damage_and_versions(tmp_path):
    write_index(tmp_path / "index")
    path = tmp_path / "index" / "index.json"
    manifest = json.loads(path.read_text())

    def read(document):
        path.write_text(json.dumps(document))
        return IndexFiles(tmp_path / "index", "test index", FORMAT).read_manifest(older_formats=["test-index-v1"])

    with pytest.raises(DamagedIndexError, match="index.json fails its checksum"):
        read(manifest | {"size": 1001})
    with pytest.raises(OutdatedIndexError, match="written by an older version"):
        read({"format": "test-index-v1", "size": 1000})
    with pytest.raises(DamagedIndexError, match="index.json has no checksum"):
        read({"format": "something", "size": 1000})
    path.write_text("[1, 2")
    with pytest.raises(DamagedIndexError, match=r"test index .* is damaged or inconsistent \(index\.json is unread"):
        IndexFiles(tmp_path / "index", "test index", FORMAT).read_manifest()


def test_a_full_disk_is_one_line_naming_the_index(tmp_path, monkeypatch):
    files = IndexFiles(tmp_path, "test index", FORMAT)

    class FullDisk:
        def __init__(self, file) -> None:
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_files, "_ChecksummedWriter", FullDisk)
    with pytest.raises(InputError, match=rf"^no space left on device while writing test index {tmp_path} "
                                         r"\(big\.npy\): free space and rerun"):
        files.write_array("big.npy", np.zeros(10))
    assert list(tmp_path.iterdir()) == []  # the temporary is gone
    with pytest.raises(InputError, match=r"no space left on device for merging in test index .*: it needs 1048576\.0"):
        files.require_room(2**40, "merging")


def test_another_kind_of_index_is_refused_not_cleared(tmp_path):
    """An index folder given for another kind of index (e.g. --global_index pointing at the ASMK
    folder) is one line, and nothing of the other index is deleted; another version of the same
    kind is 'outdated' (rebuilt)."""
    write_index(tmp_path / "index")
    listed = sorted(path.name for path in (tmp_path / "index").iterdir())
    with pytest.raises(InputError, match=r"holds another kind of index \(test-index-v2\), not the other index"):
        IndexFiles(tmp_path / "index", "other index", "other-index-v1").read_manifest()
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == listed
    with pytest.raises(OutdatedIndexError, match="has format 'test-index-v2', this version reads 'test-index-v3'"):
        IndexFiles(tmp_path / "index", "test index", "test-index-v3").read_manifest()
