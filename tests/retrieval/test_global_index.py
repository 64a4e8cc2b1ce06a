"""The global-descriptor index beside a feature store (retrieval.mode global): exact scores, built,
completed, rebuilt when an image's content changed, merged, checked on open."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import src.retrieval.global_index as global_index_module
from model_utils.cli import InputError
from src.extraction.features import LocalFeatures
from src.extraction.store import FeatureStore
from src.retrieval.global_index import (
    GlobalIndex,
    StoreGlobalSource,
    index_path_for,
    open_or_build_global_index,
)
from src.retrieval.index_files import DamagedIndexError

DIM = 24


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector, axis=-1, keepdims=True)).astype(np.float32)


class DictSource:
    """Global descriptors held in a dict; the checksum is a version number bumped on change."""

    def __init__(self, count: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.vectors = {f"img{n:03d}": unit(rng.normal(size=DIM)) for n in range(count)}
        self.versions = dict.fromkeys(self.vectors, 0)
        self.reads = 0

    @property
    def ids(self) -> list[str]:
        return list(self.vectors)

    def set(self, image_id: str, vector: np.ndarray) -> None:
        self.vectors[image_id] = vector.astype(np.float32)
        self.versions[image_id] = self.versions.get(image_id, 0) + 1

    def global_descriptor(self, image_id: str) -> np.ndarray:
        self.reads += 1
        return self.vectors[image_id]

    def checksum(self, image_id: str) -> str:
        return f"v{self.versions[image_id]}"

    def fingerprint(self) -> None:
        return None


def matrix(source: DictSource, ids) -> np.ndarray:
    return np.stack([source.vectors[image_id] for image_id in ids]).astype(np.float64)


def queries(count: int = 5, seed: int = 9) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(count, DIM)))


def assert_exact(index: GlobalIndex, source: DictSource) -> None:
    """Scores equal the float64 products of the source's vectors (float32 rounding apart)."""
    want = queries().astype(np.float64) @ matrix(source, index.image_ids).T
    np.testing.assert_allclose(index.scores(queries()), want, rtol=0, atol=2e-6)


def test_build_scores_search_and_memory_map(tmp_path):
    source = DictSource(40)
    index = open_or_build_global_index(tmp_path / "g", source, source.ids)
    assert index.image_ids == source.ids and index.dim == DIM
    assert_exact(index, source)
    # The descriptors are mapped from the file, not read into memory.
    assert all(isinstance(segment.descriptors.base, np.memmap) for segment in index.segments)
    # Top k by faiss equal the brute-force top k.
    scores, numbers = index.search(queries(), 7)
    brute = queries().astype(np.float64) @ matrix(source, source.ids).T
    np.testing.assert_array_equal(numbers, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :7], atol=2e-6)
    np.testing.assert_array_equal(index.rows(np.array([5, 0, 39])), matrix(source, ["img005", "img000", "img039"]))
    # Bytes per image: the float32 row plus the id and checksum.
    assert DIM * 4 < index.num_bytes() / 40 < DIM * 4 + 100
    assert index_path_for(tmp_path / "db.h5") == tmp_path / "db.h5.global"


def test_added_images_go_to_a_new_segment_and_segments_merge(tmp_path, monkeypatch):
    source = DictSource(30)
    first = open_or_build_global_index(tmp_path / "g", source, source.ids[:10])
    assert len(first.segments) == 1 and source.reads == 10
    index = open_or_build_global_index(tmp_path / "g", source, source.ids[:20])
    assert len(index.segments) == 2 and source.reads == 20  # only the new images were read
    assert_exact(index, source)
    _, numbers = index.search(queries(), 15)  # the top 15 over both segments (10 + 10 images)
    brute = queries().astype(np.float64) @ matrix(source, source.ids[:20]).T
    np.testing.assert_array_equal(numbers, np.argsort(-brute, axis=1, kind="stable")[:, :15])
    monkeypatch.setattr(global_index_module, "SEGMENT_IMAGES", 16)
    monkeypatch.setattr(global_index_module, "MAX_SEGMENTS", 0)
    index = open_or_build_global_index(tmp_path / "g", source, source.ids)  # 3 segments of 10 > 2 of 16: merged
    assert [len(segment.image_ids) for segment in index.segments] == [16, 14]
    assert not index.needs_merge()
    assert index.image_ids == source.ids
    assert_exact(index, source)
    reopened = GlobalIndex.open(tmp_path / "g")
    assert reopened.image_ids == source.ids and reopened.checksums == ["v0"] * 30
    assert_exact(reopened, source)
    assert sorted(p.name for p in (tmp_path / "g").glob("segment-*")) == sorted(
        f"{segment.name}.{suffix}" for segment in reopened.segments for suffix in ("descriptors.npy", "images.json"))


def test_an_image_whose_content_changed_rebuilds_the_index(tmp_path, caplog):
    source = DictSource(12)
    open_or_build_global_index(tmp_path / "g", source, source.ids)
    reads = source.reads
    open_or_build_global_index(tmp_path / "g", source, source.ids)
    assert source.reads == reads  # in step: nothing read again
    source.set("img004", unit(np.ones(DIM)))
    with caplog.at_level(logging.WARNING):
        index = open_or_build_global_index(tmp_path / "g", source, source.ids)
    assert "rebuilding the global-descriptor index" in caplog.text and "'img004'" in caplog.text
    assert index.checksums[index.number_of["img004"]] == "v1"
    assert_exact(index, source)
    # An image outside the database asked for is not compared (it stays as it was).
    source.set("img011", unit(-np.ones(DIM)))
    index = open_or_build_global_index(tmp_path / "g", source, source.ids[:11])
    assert index.checksums[index.number_of["img011"]] == "v0"


def test_store_source_keys_on_the_store_checksum_and_fingerprint(tmp_path, monkeypatch):
    path = tmp_path / "db.h5"
    ones = np.ones(3, np.float32)
    features = LocalFeatures(np.zeros((3, 2), np.float32), ones, np.ones((3, 4), np.float32), ones)
    rng = np.random.default_rng(0)
    vectors = {f"img{n}": unit(rng.normal(size=DIM)) for n in range(6)}
    with FeatureStore(path) as store:
        for image_id, vector in vectors.items():
            store.put(image_id, features, image_size=(9, 9), settings_hash="h", global_descriptor=vector)
    with FeatureStore(path) as store:
        source = StoreGlobalSource(store)
        index = open_or_build_global_index(index_path_for(path), source, sorted(vectors))
        np.testing.assert_array_equal(index.rows(np.arange(6)), np.stack([vectors[k] for k in sorted(vectors)]))
        compared = []
        monkeypatch.setattr(StoreGlobalSource, "checksum",
                            lambda self, image_id: compared.append(image_id) or str(self.store.content(image_id)[1]))
        open_or_build_global_index(index_path_for(path), source, sorted(vectors))
        assert compared == []  # the store's state did not change: its checksums are not read again
        store.put("img3", features, image_size=(9, 9), settings_hash="h", global_descriptor=vectors["img0"])
        index = open_or_build_global_index(index_path_for(path), source, sorted(vectors))
        assert compared  # the store changed: compared, found changed, rebuilt
        np.testing.assert_array_equal(index.rows(np.array([index.number_of["img3"]]))[0], vectors["img0"])


def test_damaged_index_files_are_one_line_errors(tmp_path):
    source = DictSource(10)
    directory = tmp_path / "g"
    index = open_or_build_global_index(directory, source, source.ids)
    descriptors = directory / f"{index.segments[0].name}.descriptors.npy"
    data = bytearray(descriptors.read_bytes())
    data[-5] ^= 0x40
    descriptors.write_bytes(bytes(data))
    for opening in (lambda: GlobalIndex.open(directory), lambda: open_or_build_global_index(directory, source,
                                                                                           source.ids)):
        with pytest.raises(DamagedIndexError) as error:
            opening()
        message = str(error.value)
        assert "\n" not in message and "fails its checksum" in message and f"delete {directory} to rebuild" in message
    (directory / "index.json").write_text("{")
    with pytest.raises(DamagedIndexError, match=rf"index.json is unreadable.*delete {directory} to rebuild"):
        GlobalIndex.open(directory)


def test_bad_inputs_are_one_line_errors_and_committed_segments_stay(tmp_path, monkeypatch):
    monkeypatch.setattr(global_index_module, "SEGMENT_IMAGES", 2)
    source = DictSource(4)
    source.vectors["img002"] = np.ones(DIM + 1, np.float32)
    with pytest.raises(InputError, match=r"global descriptor of 'img002' has shape \(25,\), but .* holds 24-D"):
        open_or_build_global_index(tmp_path / "g", source, source.ids)
    reads = source.reads
    index = open_or_build_global_index(tmp_path / "g", source, source.ids[:2])  # the first segment was committed
    assert index.image_ids == source.ids[:2] and source.reads == reads
    with pytest.raises(InputError, match=r"query global descriptors of shape \(1, 3\) do not fit"):
        index.scores(np.ones((1, 3)))
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file, not a folder"):
        open_or_build_global_index(tmp_path / "file", source, source.ids[:2])
    empty = open_or_build_global_index(tmp_path / "empty", source, [])
    assert empty.scores(queries()).shape == (5, 0)
