"""Store shards (one per msrun rank) read as one store; which share a process takes; layout checks."""

import shutil

import numpy as np
import pytest

from model_utils.cli import InputError
from src.extraction.features import LocalFeatures
from src.extraction.sharding import Shard, check_output_layout, device_id, is_msrun_scheduler, resolve_shard
from src.extraction.store import FeatureStore
from src.extraction.store_set import ShardedFeatureStore, ensure_store, export_npz, find_shards, open_store, shard_path
from src.feature_io import main as feature_io

MSRUN_VARIABLES = ("MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM", "DEVICE_ID")


@pytest.fixture(autouse=True)
def no_msrun(monkeypatch):
    for name in MSRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _features(seed: int, count: int = 3) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    return LocalFeatures(rng.uniform(0, 100, (count, 2)).astype(np.float32), np.ones(count, np.float32),
                         rng.standard_normal((count, 8)).astype(np.float32),
                         rng.uniform(0, 1, count).astype(np.float32))


IDS = [f"img{index:02d}" for index in range(7)]


def _write_shards(path, size: int, compact: bool = True) -> dict[str, LocalFeatures]:
    """Shards of `size` ranks of IDS, as the ranks write them; returns the features written."""
    written = {}
    for rank in range(size):
        shard = Shard(rank, size)
        store = FeatureStore(shard.store(path))
        for image_id in shard.take(dict.fromkeys(IDS)):
            written[image_id] = _features(IDS.index(image_id))
            store.put(image_id, written[image_id], image_size=(30, 40), settings_hash="h")
        if compact:
            store.close()  # compacts; otherwise the shard stays a journal, as when its rank was killed
    return written


def test_shards_partition_the_sorted_list_and_are_named_by_rank():
    images = {name: f"/x/{name}.jpg" for name in reversed(IDS)}
    parts = [Shard(rank, 3).take(images) for rank in range(3)]
    assert list(parts[1]) == ["img01", "img04"]
    assert sorted(k for part in parts for k in part) == IDS and sum(map(len, parts)) == len(IDS)
    assert parts[0]["img03"] == "/x/img03.jpg"
    assert shard_path("out/features.h5", 1, 4).as_posix() == "out/features.rank1-of-4.h5"
    assert Shard(1, 4).store("features.h5").name == "features.rank1-of-4.h5" and str(Shard(1, 4)) == "rank 1 of 4"


@pytest.mark.parametrize("compact", [True, False])
def test_a_set_of_shards_reads_as_the_store_it_replaces(tmp_path, compact):
    path = tmp_path / "features.h5"
    written = _write_shards(path, 3, compact)
    (tmp_path / "features.rank0-of-3.h5.failures.txt").write_text("")  # never taken for a shard
    assert sorted(find_shards(path)[3]) == [0, 1, 2]
    with open_store(path) as store:
        assert isinstance(store, ShardedFeatureStore)
        assert store.image_ids() == IDS
        for image_id, features in written.items():
            for got, want in zip(store.get(image_id), features, strict=True):
                np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(store.keypoints(image_id).descriptors, features.descriptors)
            assert store.attributes(image_id) == {"image_size": (30, 40), "settings_hash": "h", "num_features": 3}
        assert store.is_done("img05", "h") and not store.is_done("img05", "other") and not store.is_done("x", "h")
        with pytest.raises(InputError, match=r"no features for image 'x' in feature store .*features\.rank\*-of-3\.h5"):
            store.get("x")
    # A glob or a list of stores also reads as one.
    assert open_store(tmp_path / "features.rank*-of-3.h5").image_ids() == IDS
    assert open_store([shard_path(path, r, 3) for r in (0, 2)]).image_ids() == [i for i in IDS if IDS.index(i) % 3 != 1]


def test_export_list_and_compact_go_over_all_shards(tmp_path, capsys):
    path = tmp_path / "features.h5"
    written = _write_shards(path, 2, compact=False)
    assert export_npz(path, tmp_path / "npz") == len(IDS)
    with np.load(tmp_path / "npz" / "img03.npz") as exported:
        np.testing.assert_array_equal(exported["descriptors"], written["img03"].descriptors)
    assert feature_io(["compact", str(path)]) == 0
    assert not list((tmp_path / "features.rank1-of-2.h5.journal").glob("*.npz"))
    assert feature_io(["list", str(path)]) == 0
    assert capsys.readouterr().out.count("30x40\t3 features") == len(IDS)


def test_incomplete_mixed_or_ambiguous_sets_are_refused_by_name(tmp_path):
    path = tmp_path / "features.h5"
    _write_shards(path, 3)
    shard_path(path, 1, 3).unlink()
    shutil.rmtree(tmp_path / "features.rank1-of-3.h5.journal")
    with pytest.raises(InputError, match=r"1 of 3 shards missing, first features\.rank1-of-3\.h5: run rank 1 of 3"):
        open_store(path)
    ensure_store(shard_path(path, 1, 3))  # an empty shard (a rank without images) completes the set
    assert open_store(path).image_ids() == [i for i in IDS if IDS.index(i) % 3 != 1]
    _write_shards(path, 2)
    with pytest.raises(InputError, match="shards of runs over 2 and 3 ranks are mixed"):
        open_store(path)

    other = tmp_path / "other.h5"
    _write_shards(other, 2)
    with FeatureStore(other) as single:
        single.put("img00", _features(0), image_size=(30, 40), settings_hash="h")
    with pytest.raises(InputError, match="other.h5 and shards of it .* both exist"):
        open_store(other)
    twice = tmp_path / "twice.h5"
    _write_shards(twice, 2)
    with FeatureStore(shard_path(twice, 1, 2)) as shard:
        shard.put("img00", _features(0), image_size=(30, 40), settings_hash="h")
    with pytest.raises(InputError, match="'img00' is in two shards"):
        open_store(twice).image_ids()
    with pytest.raises(FileNotFoundError, match="absent.h5 not found"):
        open_store(tmp_path / "absent.h5")
    with pytest.raises(FileNotFoundError, match="no feature store matches"):
        open_store(tmp_path / "absent.rank*.h5")


def test_writers_refuse_to_mix_one_store_with_shards(tmp_path):
    path = tmp_path / "features.h5"
    check_output_layout(path, None)
    check_output_layout(path, Shard(0, 2))
    _write_shards(path, 2)
    check_output_layout(path, Shard(1, 2))  # resuming a rank
    with pytest.raises(InputError, match=r"was extracted in 2 shards .*--rank_id R --rank_size 2"):
        check_output_layout(path, None)
    with pytest.raises(InputError, match="from a run over 2 ranks exist .* this run has 4"):
        check_output_layout(path, Shard(0, 4))
    single = tmp_path / "single.h5"
    ensure_store(single)
    assert open_store(single).image_ids() == []
    with pytest.raises(InputError, match="single.h5 exists as one store"):
        check_output_layout(single, Shard(0, 2))


def test_rank_comes_from_msrun_or_from_the_command_line(monkeypatch):
    assert resolve_shard() is None and not is_msrun_scheduler() and device_id(3) == 3
    assert resolve_shard(1, 3) == Shard(1, 3)
    assert resolve_shard(0, 1) is None  # one rank: the plain store
    with pytest.raises(InputError, match="need 0 <= rank_id < rank_size"):
        resolve_shard(3, 3)
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    assert is_msrun_scheduler()
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    monkeypatch.setenv("DEVICE_ID", "1")
    with pytest.raises(InputError, match="pass --node_rank to msrun"):
        resolve_shard()
    monkeypatch.setenv("MS_NODE_ID", "3")
    assert resolve_shard() == Shard(3, 4) and device_id(0) == 1 and not is_msrun_scheduler()
    with pytest.raises(InputError, match="without msrun"):
        resolve_shard(0, 2)
