"""The ASMK index never returns damage as a result and never ends in a traceback (issue 20, items 1,
2, 5, 6, 7, 8, 10 and 11): damaged, empty and inconsistent index files, features changed under an
index, a full disk while building or merging, read-only storage and copies, a file given as the
index folder. Retrieval runs through the CLI (src/perform_retrieval.py), as a user runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_rerank import build_world, write_classic_ground_truth
from tmpfs import remount, small_tmpfs

from src.extraction.store import FeatureStore
from src.perform_retrieval import main
from src.retrieval import index_files
from src.retrieval.index_build import StoreSource, open_or_build_index
from src.retrieval.inverted_file import AsmkIndex

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# perform_retrieval with the index's segment size and merge threshold set from the command line;
# or, with a number of images, only an index of the first images of the database (no retrieval).
DRIVER = """
import sys
from pathlib import Path
from src.retrieval import inverted_file
segment_entries, max_segments, merge, first = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "merge", \\
    int(sys.argv[4])
for name in ("src.retrieval.inverted_file", "src.retrieval.index_build"):
    module = sys.modules.get(name) or __import__(name, fromlist=["x"])
    module.SEGMENT_ENTRIES, module.MAX_SEGMENTS = segment_entries, max_segments
if not merge:
    inverted_file.AsmkIndex.merge = lambda self: None
if first:
    from src.extraction.store import FeatureStore
    from src.retrieval.index_build import StoreSource, open_or_build_index
    value = lambda flag: sys.argv[sys.argv.index(flag) + 1]
    database = sorted(path.stem for path in Path(value("--images_path")).iterdir())
    with FeatureStore(value("--index_features")) as store:
        open_or_build_index(value("--asmk_index"), StoreSource([store]), database[:first])
    sys.exit(0)
from src.perform_retrieval import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("world")
    world = build_world(directory)
    write_classic_ground_truth(world, directory / "gt", directory / "jpg")
    return world


def arguments(world: dict, index_dir: Path, output_dir: Path, store: Path | None = None) -> list[str]:
    return ["--query_features", str(world["dir"] / "query.h5"), "--index_features",
            str(store or world["dir"] / "index.h5"), "--gt_path", str(world["dir"] / "gt"),
            "--images_path", str(world["dir"] / "jpg"), "--output_dir", str(output_dir),
            "--retrieval.shortlist_size=4", *(["--asmk_index", str(index_dir)] if index_dir else [])]


def retrieve_cli(world: dict, index_dir: Path | None, output_dir: Path, capsys, store: Path | None = None):
    """(exit status, stderr, medium ranks or None) of perform_retrieval run in this process."""
    capsys.readouterr()
    try:
        status = main(arguments(world, index_dir, output_dir, store))
    except SystemExit as stop:
        status = stop.code
    error = capsys.readouterr().err
    ranks = np.load(output_dir / "ranks_medium.npy", allow_pickle=False) if status == 0 else None
    return status, error, ranks


def the_error_line(status: int, stderr: str) -> str:
    """The one `error:` line of a run that failed cleanly."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def built(world, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An index built by the CLI, and the ranks it gave."""
    directory = tmp_path_factory.mktemp("built")
    status = main(arguments(world, directory / "asmk", directory / "out"))
    assert status == 0
    return directory / "asmk", np.load(directory / "out" / "ranks_medium.npy", allow_pickle=False)


def copy_of(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "asmk"))


def segment_file(index_dir: Path, suffix: str) -> Path:
    return sorted(index_dir.glob(f"segment-*.{suffix}"))[0]


def reseal(index_dir: Path) -> None:
    """Recompute the manifest's file sizes and checksums and its own checksum, as a writer that wrote
    inconsistent files would have: only the structural checks can catch what the files hold then."""
    manifest_path = index_dir / "index.json"
    manifest = json.loads(manifest_path.read_text())
    if "files" not in manifest:  # an index of the version before checksums
        return
    for name in manifest["files"]:
        data = (index_dir / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    manifest["checksum"] = f"crc32:{zlib.crc32(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()):08x}"
    manifest_path.write_text(json.dumps(manifest))


# -- item 1: damaged files ------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["codes.npy", "images.npy", "offsets.npy", "words.npy", "images.json",
                                    "codebook.npy"])
def test_a_flipped_byte_in_any_index_file_is_one_line_never_a_ranking(world, built, tmp_path, capsys, victim):
    index_dir = copy_of(built, tmp_path)
    path = index_dir / victim if victim == "codebook.npy" else segment_file(index_dir, victim)
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x10
    path.write_bytes(bytes(data))
    status, stderr, _ = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    line = the_error_line(status, stderr)
    assert f"ASMK index {index_dir} is damaged" in line and path.name in line and f"delete {index_dir}" in line


def test_damage_after_the_files_were_verified_once_is_still_detected(world, built, tmp_path, capsys, monkeypatch):
    """verified.json spares re-reading unchanged files; a later write changes what it keys on."""
    index_dir = copy_of(built, tmp_path)
    reads = []
    crc = index_files.file_crc32
    monkeypatch.setattr(index_files, "file_crc32", lambda path: reads.append(path.name) or crc(path))
    monkeypatch.setattr(index_files, "_now_ns", lambda: time.time_ns() + 10**10)  # files "older" than the margin
    AsmkIndex.open(index_dir)
    listed = json.loads((index_dir / "index.json").read_text())["files"]
    assert sorted(reads) == sorted(listed) and (index_dir / "verified.json").is_file()
    reads.clear()
    AsmkIndex.open(index_dir)
    assert reads == []  # unchanged: nothing read again
    time.sleep(0.05)  # the clock was moved past the margin; let the real one pass a timestamp tick too
    path = segment_file(index_dir, "codes.npy")
    with open(path, "r+b") as file:
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 1]))
    status, stderr, _ = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    assert "codes.npy fails its checksum" in the_error_line(status, stderr)


# -- item 7: empty files; item 8: well-formed but inconsistent files -------------------------------


@pytest.mark.parametrize("victim", ["codes.npy", "images.npy", "offsets.npy", "words.npy", "images.json",
                                    "codebook.npy", "index.json"])
def test_an_empty_index_file_is_one_line(world, built, tmp_path, capsys, victim):
    index_dir = copy_of(built, tmp_path)
    path = index_dir / victim if victim in ("codebook.npy", "index.json") else segment_file(index_dir, victim)
    path.write_bytes(b"")
    status, stderr, _ = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    assert f"ASMK index {index_dir} is damaged" in the_error_line(status, stderr)


def _descending_offsets(offsets):
    offsets[len(offsets) // 2] = offsets[-1] + 1
    return offsets


INCONSISTENCIES = {
    "offsets not ascending": ("offsets.npy", _descending_offsets),
    "image number past the last image": ("images.npy", lambda images: np.concatenate([[10**6], images[1:]])
                                         .astype(np.uint32)),
    "half the code rows": ("codes.npy", lambda codes: codes[: len(codes) // 2]),
    "float offsets": ("offsets.npy", lambda offsets: offsets.astype(np.float64)),
    "words per image one short": ("words.npy", lambda words: words[:-1]),
    "codes one byte narrower": ("codes.npy", lambda codes: np.ascontiguousarray(codes[:, 1:])),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENCIES))
def test_inconsistent_index_files_are_one_line(world, built, tmp_path, capsys, case):
    index_dir = copy_of(built, tmp_path)
    suffix, change = INCONSISTENCIES[case]
    path = segment_file(index_dir, suffix)
    np.save(path, change(np.load(path, allow_pickle=False)))
    reseal(index_dir)  # checksums that fit: only the consistency checks can tell
    status, stderr, _ = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    assert f"ASMK index {index_dir} is damaged or inconsistent" in the_error_line(status, stderr)


@pytest.mark.parametrize("resealed", [False, True])
def test_a_damaged_manifest_key_is_one_line(world, built, tmp_path, capsys, resealed):
    index_dir = copy_of(built, tmp_path)
    manifest = index_dir / "index.json"
    manifest.write_text(manifest.read_text().replace('"segments"', '"segmentz"'))
    if resealed:
        reseal(index_dir)
    status, stderr, _ = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    line = the_error_line(status, stderr)
    assert "index.json" in line and ("fails its checksum" in line) != resealed


# -- item 2: features changed under the index -----------------------------------------------------


def test_an_image_extracted_again_with_the_same_settings_is_indexed_again(world, tmp_path):
    """A photo replaced and re-extracted: same settings_hash, other features. The index must give
    what an index of the current features gives, not the old entries."""
    store_path = tmp_path / "index.h5"
    shutil.copy(world["dir"] / "index.h5", store_path)
    imlist = world["ground_truth"]["imlist"]
    with FeatureStore(store_path) as store:
        old = open_or_build_index(tmp_path / "asmk", StoreSource([store]), imlist)
        codebook = old.codebook
    changed, lookalike = imlist[3], imlist[10]
    replacement = world["database"][lookalike]  # the photo now shows what another one does
    with FeatureStore(store_path) as store:
        store.put(changed, replacement, image_size=(600, 800), settings_hash="synthetic")
    with FeatureStore(store_path) as store:
        source = StoreSource([store])
        updated = open_or_build_index(tmp_path / "asmk", source, imlist)
        fresh = AsmkIndex.create(tmp_path / "fresh", codebook)
        fresh.add(source, imlist)
    query = world["queries"]["query0"].descriptors
    numbers = [updated.number_of[name] for name in imlist]
    np.testing.assert_allclose(updated.scores(query)[numbers], fresh.scores(query), rtol=1e-12)
    assert updated.number_of[changed] != old.number_of[changed]
    reopened = AsmkIndex.open(tmp_path / "asmk")  # the change is committed, and a merge drops the old entries
    np.testing.assert_allclose(reopened.scores(query)[numbers], fresh.scores(query), rtol=1e-12)
    reopened.merge()
    merged = AsmkIndex.open(tmp_path / "asmk")
    assert merged.image_ids == [*(i for i in imlist if i != changed), changed] and not merged.removed
    np.testing.assert_allclose(merged.scores(query)[[merged.number_of[n] for n in imlist]], fresh.scores(query),
                               rtol=1e-12)


# -- items 5 and 6: a full disk ---------------------------------------------------------------------


def run_driver(world, index_dir: Path, output_dir: Path, segment_entries: int, max_segments: int,
               merge: bool, first: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(segment_entries), str(max_segments),
                           "merge" if merge else "no-merge", str(first), *arguments(world, index_dir, output_dir)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)


def used_bytes(directory: Path) -> int:
    status = shutil.disk_usage(directory)
    return status.used


def test_a_full_disk_while_segments_are_merged_is_one_line_and_a_rerun_cleans_up(world, tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        index_dir = disk / "asmk"
        # An index of most images in several segments; the retrieval then adds the others and merges.
        done = run_driver(world, index_dir, tmp_path / "out1", 400, 100, merge=False, first=24)
        assert done.returncode == 0, done.stderr
        assert len(list(index_dir.glob("segment-*.codes.npy"))) > 3
        reference = shutil.copytree(index_dir, tmp_path / "reference")
        remount(disk, f"size={used_bytes(disk) + 12 * 4096}")  # room for the added images, not a merged copy
        full = run_driver(world, index_dir, tmp_path / "out2", 1 << 23, 2, merge=True)
        line = the_error_line(full.returncode, full.stderr)
        assert "no space left on device" in line and str(index_dir) in line
        # what a merge killed mid-write (SIGBUS, power cut) leaves behind
        (index_dir / ".segment-000099.codes.npy.abcd1234.99999.tmp").write_bytes(b"\0" * 1000)
        remount(disk, "size=4m")
        resumed = run_driver(world, index_dir, tmp_path / "out3", 1 << 23, 2, merge=True)
        assert resumed.returncode == 0, resumed.stderr
        assert list(index_dir.glob(".*")) == [] and len(list(index_dir.glob("segment-*.codes.npy"))) == 1
    status, stderr, ranks = retrieve_cli(world, reference, tmp_path / "out4", capsys)  # the same, never full
    assert status == 0, stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out3" / "ranks_medium.npy"), ranks)


@pytest.mark.parametrize("room", ["codebook", "segment"])
def test_a_full_disk_while_the_index_is_built_is_one_line_and_resumes(world, built, tmp_path, room):
    codebook_bytes = (built[0] / "codebook.npy").stat().st_size
    size = codebook_bytes // 2 if room == "codebook" else codebook_bytes + 3 * 4096
    with small_tmpfs(tmp_path / "disk", str(size)) as disk:
        index_dir = disk / "asmk"
        full = run_driver(world, index_dir, tmp_path / "out1", 1 << 23, 8, merge=True)
        line = the_error_line(full.returncode, full.stderr)
        assert "no space left on device while writing ASMK index" in line and str(index_dir) in line
        assert (index_dir / "codebook.npy").exists() == (room == "segment")
        remount(disk, "size=4m")
        resumed = run_driver(world, index_dir, tmp_path / "out2", 1 << 23, 8, merge=True)
        assert resumed.returncode == 0, resumed.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "out2" / "ranks_medium.npy"), built[1])


# -- item 10: read-only storage and copies -----------------------------------------------------------


def test_an_index_in_step_with_its_store_works_read_only_even_after_the_store_was_touched_or_copied(
        world, built, tmp_path, capsys):
    imlist = world["ground_truth"]["imlist"]
    with small_tmpfs(tmp_path / "disk", "16m") as disk, small_tmpfs(tmp_path / "copy", "16m") as copy:
        store = disk / "index.h5"
        shutil.copy(world["dir"] / "index.h5", store)
        status, stderr, ranks = retrieve_cli(world, None, tmp_path / "out1", capsys, store=store)
        assert status == 0, stderr
        np.testing.assert_array_equal(ranks, built[1])
        with FeatureStore(store) as features:  # touched and compacted, the content unchanged
            features.put(imlist[0], features.get(imlist[0]), image_size=(600, 800), settings_hash="synthetic")
        remount(disk, "ro")
        status, stderr, ranks = retrieve_cli(world, None, tmp_path / "out2", capsys, store=store)
        assert status == 0, stderr
        np.testing.assert_array_equal(ranks, built[1])

        for path in disk.iterdir():  # store and index copied elsewhere, then made read-only
            (shutil.copytree if path.is_dir() else shutil.copy)(path, copy / path.name)
        remount(copy, "ro")
        status, stderr, ranks = retrieve_cli(world, None, tmp_path / "out3", capsys, store=copy / "index.h5")
        assert status == 0, stderr
        np.testing.assert_array_equal(ranks, built[1])

        remount(disk, "rw")  # features that changed: a read-only index cannot follow, and says so
        with FeatureStore(store) as features:
            other = features.get(imlist[1])
            features.put(imlist[0], other, image_size=(600, 800), settings_hash="synthetic")
        remount(disk, "ro")
        status, stderr, _ = retrieve_cli(world, None, tmp_path / "out4", capsys, store=store)
        assert "cannot write ASMK index" in the_error_line(status, stderr)


# -- item 11, and an index of the previous version ---------------------------------------------------


def test_a_file_given_as_the_index_folder_is_one_line(world, tmp_path, capsys):
    (tmp_path / "asmk").write_text("not a folder")
    status, stderr, _ = retrieve_cli(world, tmp_path / "asmk", tmp_path / "out", capsys)
    assert the_error_line(status, stderr) == f"error: ASMK index folder {tmp_path / 'asmk'} is a file, not a folder"


def test_an_index_of_the_previous_format_is_rebuilt(world, built, tmp_path, capsys):
    index_dir = copy_of(built, tmp_path)
    manifest = json.loads((index_dir / "index.json").read_text())
    manifest = {key: value for key, value in manifest.items() if key not in ("files", "checksum")}
    (index_dir / "index.json").write_text(json.dumps(manifest | {"format": "delf-asmk-index-v1"}))
    status, stderr, ranks = retrieve_cli(world, index_dir, tmp_path / "out", capsys)
    assert status == 0 and "older version" in stderr and "rebuilding" in stderr
    np.testing.assert_array_equal(ranks, built[1])
    assert json.loads((index_dir / "index.json").read_text())["format"] == "delf-asmk-index-v2"
