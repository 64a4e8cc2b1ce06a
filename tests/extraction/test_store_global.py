"""Global descriptors (DELG) in the feature store: stored with the local features, checksummed,
read by the same API and the shard-set reader, kept by compaction and repair; old stores read."""

import h5py
import numpy as np
import pytest

from model_utils.cli import InputError
from src.extraction.features import LocalFeatures, StoredFeatures, features_checksum
from src.extraction.store import FeatureStore
from src.extraction.store_reader import DamagedImageError, NoGlobalDescriptorError
from src.extraction.store_set import export_npz, open_store, shard_path
from src.feature_io import main


def local_features(index: int, count: int = 12, depth: int = 16) -> LocalFeatures:
    rng = np.random.default_rng(index)
    return LocalFeatures(rng.uniform(0, 300, (count, 2)).astype(np.float32), np.ones(count, np.float32),
                         rng.normal(size=(count, depth)).astype(np.float32),
                         rng.uniform(1, 9, count).astype(np.float32))


def global_of(index: int, dim: int = 32) -> np.ndarray:
    vector = np.random.default_rng([index, 7]).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def put(store: FeatureStore, index: int, with_global: bool = True, **kwargs) -> None:
    store.put(f"img{index}", local_features(index), image_size=(300, 400), settings_hash="h",
              global_descriptor=global_of(index) if with_global else None, **kwargs)


def assert_image(store, index: int, with_global: bool = True) -> None:
    want = local_features(index)
    got = store.get(f"img{index}")
    for name, a, b in zip(LocalFeatures._fields, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    if with_global:
        descriptor = store.global_descriptor(f"img{index}")
        assert descriptor.dtype == np.float32 and descriptor.shape == (32,)
        np.testing.assert_array_equal(descriptor, global_of(index))
        np.testing.assert_array_equal(store.stored(f"img{index}").global_descriptor, global_of(index))
    else:
        assert store.stored(f"img{index}").global_descriptor is None


def test_round_trip_with_and_without_global_descriptors(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        put(store, 0)
        put(store, 1, with_global=False)
        assert_image(store, 0)  # before compaction: read from the journal entries
        assert_image(store, 1, with_global=False)
        with pytest.raises(NoGlobalDescriptorError, match=r"image 'img1' of feature store .*s\.h5 has no global"):
            store.global_descriptor("img1")
        with pytest.raises(InputError, match="no features for image 'nope'"):
            store.global_descriptor("nope")
    with FeatureStore(path) as store:  # compacted into the HDF5 file
        assert not list(store.journal_dir.iterdir())
        assert_image(store, 0)
        assert_image(store, 1, with_global=False)
        with pytest.raises(NoGlobalDescriptorError, match="img1"):
            store.global_descriptor("img1")
    with h5py.File(path, "r") as h5:
        assert h5["img0"]["global_descriptor"].fletcher32 and "global_descriptor" not in h5["img1"]

    assert export_npz(path, tmp_path / "out") == 2
    with np.load(tmp_path / "out" / "img0.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["global_descriptor"], global_of(0))
        np.testing.assert_array_equal(npz["descriptors"], local_features(0).descriptors)
    with np.load(tmp_path / "out" / "img1.npz", allow_pickle=False) as npz:
        assert "global_descriptor" not in npz.files


def test_global_descriptor_input_is_checked(tmp_path):
    with FeatureStore(tmp_path / "s.h5") as store:
        for bad, message in [(np.zeros((2, 3)), "non-empty vector"), (np.zeros(0), "non-empty vector"),
                             (np.array([1.0, np.nan]), "NaN or infinity")]:
            with pytest.raises(InputError, match=f"global descriptor of 'x' .*{message}"):
                store.put("x", local_features(0), image_size=(3, 4), settings_hash="h", global_descriptor=bad)
        assert store.image_ids() == []
        # float64 input is stored as float32
        store.put("x", local_features(0), image_size=(3, 4), settings_hash="h",
                  global_descriptor=global_of(0).astype(np.float64))
        assert store.global_descriptor("x").dtype == np.float32


def test_shard_sets_read_global_descriptors(tmp_path):
    path = tmp_path / "features.h5"
    for rank in range(2):
        with FeatureStore(shard_path(path, rank, 2)) as shard:
            put(shard, rank, with_global=rank == 0)
    with open_store(path) as store:
        assert_image(store, 0)
        assert_image(store, 1, with_global=False)
        with pytest.raises(NoGlobalDescriptorError, match="img1"):
            store.global_descriptor("img1")
        assert store.content("img0") == ("h", store.shards[0].content("img0")[1])


def test_checksum_covers_the_global_descriptor_and_damage_is_detected(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        for index in range(3):
            put(store, index)
    with FeatureStore(path) as store:
        checksums = [store.content(f"img{index}")[1] for index in range(3)]
    stored = StoredFeatures(*local_features(0), global_descriptor=global_of(0))
    assert checksums[0] == features_checksum(stored, (300, 400), "h")
    assert checksums[0] != features_checksum(local_features(0), (300, 400), "h")  # without it
    assert checksums[0] != features_checksum(stored._replace(global_descriptor=global_of(1)), (300, 400), "h")

    # Bytes flipped on disk: HDF5's fletcher32 refuses the dataset, in the partial read and the full one.
    with h5py.File(path, "r") as h5:
        offset = h5["img1"]["global_descriptor"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as file:
        file.seek(offset + 8)
        file.write(b"\x01\x02\x03\x04")
    # A changed value in a dataset written without fletcher32 (a store rewritten by other tools):
    # the image's checksum catches it, also in global_descriptor's own read.
    with h5py.File(path, "a") as h5:
        values = h5["img2"]["global_descriptor"][()]
        values[3] += 0.25
        del h5["img2"]["global_descriptor"]
        h5["img2"].create_dataset("global_descriptor", data=values)
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.global_descriptor("img0"), global_of(0))
        for image_id, reason in [("img1", "HDF5 group"), ("img2", "checksum")]:
            for read in (store.global_descriptor, store.get):
                with pytest.raises(DamagedImageError, match=rf"image '{image_id}' .* is damaged \({reason}"):
                    read(image_id)
            assert not store.is_done(image_id, "h")

    # NaN in the journal entry (its zip CRCs intact: written by a faulty writer): refused too.
    with FeatureStore(path) as store:
        store.put("nan", local_features(5), image_size=(3, 4), settings_hash="h", global_descriptor=global_of(5))
        entry = store._journal_path("nan")
        with np.load(entry, allow_pickle=False) as npz:
            arrays = dict(npz)
        arrays["global_descriptor"][0] = np.nan
        np.savez(entry, **arrays)
        with pytest.raises(DamagedImageError, match=r"image 'nan' .* damaged \(arrays: global descriptor .* NaN"):
            store.global_descriptor("nan")
        with pytest.raises(DamagedImageError, match=r"image 'nan' .* damaged \(checksum"):
            store.get("nan")


def test_compaction_and_repair_keep_global_descriptors_and_encodings(tmp_path, capsys):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        put(store, 0, descriptor_dtype="int8")
        put(store, 1, descriptor_dtype="float16")
        put(store, 2, with_global=False)
    with FeatureStore(path) as store:
        before = {image_id: store.content(image_id)[1] for image_id in store.image_ids()}
        put(store, 3)  # a second compaction copies the old groups
    assert main(["repair", str(path)]) == 0
    assert "0 damaged dropped" in capsys.readouterr().out
    with FeatureStore(path) as store:
        assert {image_id: store.content(image_id)[1] for image_id in before} == before
        for index in (0, 1, 3):
            np.testing.assert_array_equal(store.global_descriptor(f"img{index}"), global_of(index))
        assert store.stored("img2").global_descriptor is None
    with h5py.File(path, "r") as h5:
        assert h5["img0"]["descriptors"].dtype == np.int8 and h5["img0"]["descriptor_scales"].fletcher32
        assert h5["img1"]["descriptors"].dtype == np.float16 and "descriptor_scales" not in h5["img1"]
        assert h5["img2"]["descriptors"].dtype == np.float32


def test_stores_written_before_global_descriptors_are_read_unchanged(tmp_path):
    """A 'delf-features-v2' store, written here with the layout and checksum that version wrote;
    the checksum of a float32 image without a global descriptor is the value v2 computed."""
    features = LocalFeatures(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0.5, 1, 2], np.float32),
                             (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 7, np.array([1, 2, 3], np.float32))
    assert features_checksum(features, (30, 40), "h") == "crc32:1f96f332"  # computed by the v2 code
    path = tmp_path / "v2.h5"
    with h5py.File(path, "w", libver=("v108", "latest")) as h5:
        h5.attrs["format"] = "delf-features-v2"
        group = h5.create_group("old")
        for name, array in zip(LocalFeatures._fields, features, strict=True):
            group.create_dataset(name, data=array, fletcher32=True)
        group.attrs.update(image_id="old", image_size=np.array([30, 40]), settings_hash="h", num_features=3,
                           checksum="crc32:1f96f332")
    with FeatureStore(path) as store:
        record = store.stored("old")
        assert record.verified and record.global_descriptor is None
        np.testing.assert_array_equal(record.features.descriptors, features.descriptors)
        np.testing.assert_array_equal(store.keypoints("old").descriptors, features.descriptors)
        with pytest.raises(NoGlobalDescriptorError, match="old"):
            store.global_descriptor("old")
        assert store.is_done("old", "h")


def test_content_of_an_image_not_stored_says_so(tmp_path):
    """content() (what indexes key on) of a missing image: 'not stored', not 'damaged'."""
    with FeatureStore(tmp_path / "s.h5") as store:
        put(store, 0)
    with FeatureStore(tmp_path / "s.h5") as store:
        with pytest.raises(InputError, match="no features for image 'other'") as raised:
            store.content("other")
        assert not isinstance(raised.value, DamagedImageError)
