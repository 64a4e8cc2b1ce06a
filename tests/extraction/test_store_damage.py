"""A damaged feature store: detected by checksum, reported by image id, redone on resume, repairable;
no NaN or garbage ever comes out of `get` (issue 11, item 3)."""

import h5py
import numpy as np
import pytest

from src.extraction.features import LocalFeatures, features_checksum
from src.extraction.store import FeatureStore
from src.extraction.store_reader import DAMAGED_SUFFIX, DamagedImageError, DamagedStoreError
from src.extraction.store_set import open_store, shard_path
from src.feature_io import main

IMAGES = [f"img{index:02d}" for index in range(40)]


def features_of(index: int, count: int = 1000, depth: int = 40) -> LocalFeatures:
    rng = np.random.default_rng(index)
    return LocalFeatures(rng.uniform(0, 500, (count, 2)).astype(np.float32), np.ones(count, np.float32),
                         rng.normal(size=(count, depth)).astype(np.float32),
                         rng.uniform(1, 9, count).astype(np.float32))


def finished_store(path, images=IMAGES):
    with FeatureStore(path) as store:
        for index, image_id in enumerate(images):
            store.put(image_id, features_of(index), image_size=(300, 400), settings_hash="h")
    return path


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def read_everything(store: FeatureStore) -> tuple[dict, dict]:
    """(image id -> features, image id -> damage message) over every stored image.

    Also reads each image's keypoints (re-ranking's partial read, which skips the CRC-32 over all
    four arrays): they are either exactly the stored ones or refused as damaged, never garbage.
    """
    good, damaged = {}, {}
    for image_id in store.image_ids():
        try:
            good[image_id] = store.get(image_id)
        except DamagedImageError as error:
            damaged[image_id] = str(error)
        try:
            keypoints = store.keypoints(image_id)
        except DamagedImageError as error:
            assert image_id in damaged and f"image {image_id!r} of feature store" in str(error)
        else:
            stored = features_of(IMAGES.index(image_id))
            np.testing.assert_array_equal(keypoints.locations, stored.locations)
            np.testing.assert_array_equal(keypoints.descriptors, stored.descriptors)
    return good, damaged


def test_one_megabyte_overwritten_mid_file_is_reported_redone_and_never_returned(tmp_path, capsys):
    path = finished_store(tmp_path / "s.h5")
    size = path.stat().st_size
    assert size > 4 * 2**20
    overwrite(path, size // 2 - 2**19, np.random.default_rng(0).bytes(2**20))

    with FeatureStore(path) as store:
        good, damaged = read_everything(store)
        assert damaged and good and len(good) + len(damaged) == len(IMAGES)
        for image_id, features in good.items():  # what is returned is exactly what was stored
            index = IMAGES.index(image_id)
            for got, want in zip(features, features_of(index), strict=True):
                np.testing.assert_array_equal(got, want)
        for image_id, message in damaged.items():
            assert f"image {image_id!r} of feature store {path} is damaged" in message
            assert "\n" not in message
            assert not store.is_done(image_id, "h")
        assert all(store.is_done(image_id, "h") for image_id in good)

    assert main(["list", str(path)]) == 1
    captured = capsys.readouterr()
    assert {line.split("\t")[0] for line in captured.out.splitlines() if "\tDAMAGED\t" in line} == set(damaged)
    assert f"{len(damaged)} damaged image(s)" in captured.err and "Traceback" not in captured.err

    with FeatureStore(path) as store:  # a resumed run re-extracts exactly the damaged images
        for image_id in IMAGES:
            if not store.is_done(image_id, "h"):
                store.put(image_id, features_of(IMAGES.index(image_id)), image_size=(300, 400), settings_hash="h")
    with FeatureStore(path) as store:
        good, damaged = read_everything(store)
        assert damaged == {} and sorted(good) == IMAGES


def test_flipped_bytes_in_the_data_are_caught_by_fletcher32_and_the_checksum(tmp_path):
    path = finished_store(tmp_path / "s.h5", IMAGES[:3])
    with h5py.File(path, "r") as h5:
        dataset = h5["img01"]["descriptors"]
        assert dataset.fletcher32 and h5.attrs["format"] == "delf-features-v2"
        offset = dataset.id.get_chunk_info(0).byte_offset
    overwrite(path, offset + 100, b"\x00\x01\x02\x03")
    with FeatureStore(path) as store:
        with pytest.raises(DamagedImageError, match=r"image 'img01' .* is damaged \(HDF5 group"):
            store.get("img01")
        with pytest.raises(DamagedImageError, match=r"image 'img01' .* is damaged \(HDF5 group"):
            store.keypoints("img01")
        store.get("img00")

    # With HDF5's own check switched off (as in a store copied by other tools), the CRC still catches it.
    with h5py.File(path, "a") as h5:
        group = h5["img02"]
        values = group["attention"][()]
        values[0] += 1.0
        del group["attention"]
        group.create_dataset("attention", data=values)
    with FeatureStore(path) as store, pytest.raises(DamagedImageError, match="does not match its checksum"):
        store.get("img02")


def test_damaged_journal_entries_are_damaged_images_and_are_not_merged(tmp_path):
    path = tmp_path / "s.h5"
    finished_store(path, IMAGES[:2])
    store = FeatureStore(path)
    store.put("img00", features_of(7), image_size=(300, 400), settings_hash="h2")  # newer than the HDF5 group
    store.put("img05", features_of(5), image_size=(300, 400), settings_hash="h")
    entry = store.journal_dir / "img00.npz"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    with pytest.raises(DamagedImageError, match=r"image 'img00' .* is damaged \(journal entry img00\.npz"):
        store.get("img00")
    assert not store.is_done("img00", "h2")
    store.close()  # compaction merges img05, leaves the damaged entry (and the old img00 group) alone
    assert entry.exists() and not (store.journal_dir / "img05.npz").exists()
    with h5py.File(path, "r") as h5:
        assert h5["img00"].attrs["settings_hash"] == "h"
    with FeatureStore(path) as store:
        store.put("img00", features_of(7), image_size=(300, 400), settings_hash="h2")  # redone
    with FeatureStore(path) as store:
        assert store.is_done("img00", "h2") and not entry.exists()

    # A journal entry that is not a zip archive at all.
    store = FeatureStore(path)
    store.journal_dir.mkdir(exist_ok=True)
    (store.journal_dir / "img09.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DamagedImageError, match="img09"):
        store.get("img09")
    with pytest.raises(DamagedImageError, match="img09"):
        store.keypoints("img09")
    assert not store.is_done("img09", "h")


def test_damaged_index_is_one_line_with_the_way_out_and_repair_keeps_what_is_intact(tmp_path, capsys):
    path = finished_store(tmp_path / "s.h5")
    size = path.stat().st_size
    overwrite(path, size - 3000, b"\xff" * 3000)  # the root group's index is written last
    with pytest.raises(DamagedStoreError) as error:
        FeatureStore(path).image_ids()
    message = str(error.value)
    assert "has a damaged index" in message and f"python -m src.feature_io repair {path}" in message
    with pytest.raises(SystemExit) as exit_info:
        main(["list", str(path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1

    assert main(["repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert "was unreadable" in out and f"{path}{DAMAGED_SUFFIX}" in out
    assert (tmp_path / f"s.h5{DAMAGED_SUFFIX}").stat().st_size == size  # nothing deleted
    with FeatureStore(path) as store:
        assert store.image_ids() == []  # everything is redone by the next extraction run


def test_repair_drops_only_damaged_images(tmp_path, capsys):
    path = finished_store(tmp_path / "s.h5")
    overwrite(path, path.stat().st_size // 2, b"\x00" * 2**20)
    with FeatureStore(path) as store:
        good, damaged = read_everything(store)
    assert main(["repair", str(path)]) == 0
    assert f"{len(good)} intact images" in capsys.readouterr().out
    with FeatureStore(path) as store:
        assert store.image_ids() == sorted(good)
        assert read_everything(store)[1] == {}
    assert main(["list", str(path)]) == 0


def test_stores_without_checksums_are_read_and_migrated_by_repair(tmp_path, capsys):
    """A store written before checksums ('delf-features-v1'): still readable, NaN still refused."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "delf-features-v1"
        for index, image_id in enumerate(["a", "b"]):
            group = h5.create_group(image_id)
            features = features_of(index, count=20)
            if image_id == "b":
                features.descriptors[3, 4] = np.nan
            for name, array in zip(LocalFeatures._fields, features, strict=True):
                group.create_dataset(name, data=array)
            group.attrs.update(image_id=image_id, image_size=np.array([30, 40]), settings_hash="h", num_features=20)
    with FeatureStore(path) as store:
        assert store.stored("a").verified is False
        np.testing.assert_array_equal(store.get("a").descriptors, features_of(0, count=20).descriptors)
        with pytest.raises(DamagedImageError, match="NaN or infinity in descriptors"):
            store.get("b")
        assert store.is_done("a", "h") and not store.is_done("b", "h")

    assert main(["repair", str(path)]) == 0
    assert "1 damaged dropped" in capsys.readouterr().out
    with FeatureStore(path) as store:
        migrated = store.stored("a")
        assert migrated.verified and store.image_ids() == ["a"]
    with h5py.File(path, "r") as h5:
        assert h5["a"].attrs["checksum"] == features_checksum(migrated.features, (30, 40), "h")
        assert h5["a"]["descriptors"].fletcher32


def test_checksum_covers_shapes_size_and_settings():
    features = features_of(0, count=6)
    base = features_checksum(features, (3, 4), "h")
    assert base.startswith("crc32:")
    assert features_checksum(features, (4, 3), "h") != base
    assert features_checksum(features, (3, 4), "h2") != base
    reshaped = features._replace(descriptors=features.descriptors.reshape(12, 20))
    assert features_checksum(reshaped, (3, 4), "h") != base


def test_repair_of_a_set_of_shards_repairs_each_and_creates_no_store(tmp_path, capsys):
    """`repair features.h5` for features.rank<r>-of-2.h5 (issue 20, item 9): it used to report
    "0 intact images" and create an empty features.h5.journal/ that made every reader refuse the set."""
    path = tmp_path / "features.h5"
    shards = [shard_path(path, rank, 2) for rank in range(2)]
    for rank, shard in enumerate(shards):
        with FeatureStore(shard) as store:
            for image_id in IMAGES[rank::2]:
                store.put(image_id, features_of(IMAGES.index(image_id)), image_size=(300, 400), settings_hash="h")
    overwrite(shards[1], shards[1].stat().st_size // 2, b"\x00" * 2**18)
    with open_store(path) as store:
        good, damaged = read_everything(store)
    assert damaged and all(IMAGES.index(image_id) % 2 == 1 for image_id in damaged)

    assert main(["repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{shards[0]}: {len(IMAGES[0::2])} intact images" in out
    assert f"{shards[1]}: {len(IMAGES[1::2]) - len(damaged)} intact images" in out and f"{shards[1]}.damaged" in out
    assert not path.exists() and not (tmp_path / "features.h5.journal").exists()
    with open_store(path) as store:  # the set still opens as one store, with every intact image
        assert store.image_ids() == sorted(good)
    assert main(["list", str(path)]) == 0


def test_repair_of_a_missing_store_is_one_line_and_creates_nothing(tmp_path, capsys):
    path = tmp_path / "absent.h5"
    with pytest.raises(SystemExit) as exit_info:
        main(["repair", str(path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: feature store {path} not found\n"
    with pytest.raises(FileNotFoundError):
        FeatureStore(path).repair()
    assert list(tmp_path.iterdir()) == []
