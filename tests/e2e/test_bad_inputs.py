"""A hostile folder end to end: one extraction run does every good image, lists every bad one, and
never prints a traceback (issue 11's "Done when"); a full disk and a damaged store end in one line."""

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tmpfs import remount, small_tmpfs

from src.extraction.store import FeatureStore

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Small and fast: PyNative (no graph per shape), two scales, photos scaled to 160 px.
FAST = ["--mode=pynative", "--extraction.use_pca=false", "--extraction.image_scales=[0.5,1.0]",
        "--extraction.max_image_size=160", "--extraction.score_threshold=0", "--extraction.max_feature_num=50",
        "--log_path="]
BAD = {"truncated": "truncated or corrupt image", "empty": "not an image file", "notes": "not an image file",
       "bomb": "decompression bomb"}
GOOD_PHOTOS = ("sacre_coeur1", "sacre_coeur2")
SMALL = ("tiny", "sliver")  # extracted (with a warning), not failures


def run_cli(*args, cwd=PROJECT_ROOT):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-4000:]
    return done


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path) -> None:
    """A 40000 x 40000 PNG header with no pixel data: Pillow refuses it before decoding anything."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0"))
                     + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, images_dir):
    folder = tmp_path_factory.mktemp("hostile")
    for name in GOOD_PHOTOS:
        shutil.copy(images_dir / f"{name}.jpg", folder / f"{name}.jpg")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "tiny.png")
    Image.new("RGB", (12, 2000), (30, 200, 30)).save(folder / "sliver.png")
    whole = (images_dir / "sacre_coeur1.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a photo\n")
    write_bomb(folder / "bomb.png")
    return folder


def test_one_run_extracts_every_good_image_and_lists_every_bad_one(tmp_path, bad_folder, random_checkpoint):
    store = tmp_path / "features.h5"
    command = ["src/extract_feature.py", "--images_path", bad_folder, "--output_path", store,
               "--ckpt_path", random_checkpoint, *FAST]
    first = run_cli(*command)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "4 images extracted, 0 already done" in first.stdout
    listed = [line.strip() for line in first.stderr.splitlines() if line.startswith("  ")]
    assert len(listed) == len(BAD), first.stderr
    for name, reason in BAD.items():
        assert any(name in line and reason in line for line in listed), (name, listed)
    failures = Path(str(store) + ".failures.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in failures) == sorted(BAD)
    with FeatureStore(store) as features:
        assert features.image_ids() == sorted([*GOOD_PHOTOS, *SMALL])
        assert len(features.get("sacre_coeur1").locations) > 0
        assert np.isfinite(features.get("sliver").descriptors).all()

    again = run_cli(*command)
    assert again.returncode == 1
    assert "0 images extracted, 4 already done" in again.stdout
    assert sorted(Path(str(store) + ".failures.txt").read_text().splitlines()) == sorted(failures)

    accepted = run_cli(*command, "--skip_bad_images=true")
    assert accepted.returncode == 0 and "0 images extracted, 4 already done" in accepted.stdout


def test_same_name_different_suffix_is_refused_in_one_line(tmp_path, random_checkpoint):
    Image.new("RGB", (64, 64)).save(tmp_path / "dup.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "dup.png")
    done = run_cli("src/extract_feature.py", "--images_path", tmp_path, "--output_path", tmp_path / "f.h5",
                   "--ckpt_path", random_checkpoint, *FAST)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "dup.jpg" in done.stderr and "dup.png" in done.stderr


def test_damaged_store_is_reported_then_redone_and_never_reaches_matching(tmp_path, images_dir, random_checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in GOOD_PHOTOS:
        shutil.copy(images_dir / f"{name}.jpg", folder)
    store = tmp_path / "features.h5"
    command = ["src/extract_feature.py", "--images_path", folder, "--output_path", store,
               "--ckpt_path", random_checkpoint, *FAST]
    assert run_cli(*command).returncode == 0
    with FeatureStore(store) as features:  # overwrite the data of one image in place
        offset = features._hdf5()[GOOD_PHOTOS[0]]["descriptors"].id.get_chunk_info(0).byte_offset
    with open(store, "r+b") as file:
        file.seek(offset)
        file.write(np.full(64, np.nan, np.float32).tobytes())

    listing = run_cli("-m", "src.feature_io", "list", store)
    assert listing.returncode == 1
    assert f"{GOOD_PHOTOS[0]}\tDAMAGED" in listing.stdout and f"{GOOD_PHOTOS[1]}\t" in listing.stdout
    matching = run_cli("src/match_images.py", "--images_path", folder, "--features_path", store,
                       "--image_1", GOOD_PHOTOS[0], "--image_2", GOOD_PHOTOS[1],
                       "--output_image", tmp_path / "m.png")
    assert matching.returncode == 2 and "is damaged" in matching.stderr and not (tmp_path / "m.png").exists()

    resumed = run_cli(*command)
    assert resumed.returncode == 0 and "1 images extracted, 1 already done" in resumed.stdout
    assert run_cli("-m", "src.feature_io", "list", store).returncode == 0


def test_disk_full_is_one_line_and_the_store_resumes(tmp_path, images_dir, random_checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    count = 8
    for index in range(count):
        photo = Image.open(images_dir / f"{GOOD_PHOTOS[index % 2]}.jpg")
        photo.rotate(index * 3).save(folder / f"photo{index}.jpg")
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = disk / "features.h5"
        # Raw 1024-D descriptors: 50 features take ~200 KB an image, so the disk fills after a few
        # (while writing the journal or while compacting it, depending on the photos).
        command = ["src/extract_feature.py", "--images_path", folder, "--output_path", store,
                   "--ckpt_path", random_checkpoint, *FAST]
        full = run_cli(*command)
        assert full.returncode == 2, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "no space left on device" in errors[0], full.stderr
        assert "free space and rerun to resume" in errors[0] and str(store) in errors[0]
        stored = len(FeatureStore(store).image_ids())
        assert 0 < stored <= count
        remount(disk, "size=16m")
        resumed = run_cli(*command)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{count - stored} images extracted, {stored} already done" in resumed.stdout
        with FeatureStore(store) as features:
            assert len(features.image_ids()) == count
            assert all(np.isfinite(features.get(image_id).descriptors).all() for image_id in features.image_ids())
        assert list(Path(str(store) + ".journal").glob("*.npz")) == []
