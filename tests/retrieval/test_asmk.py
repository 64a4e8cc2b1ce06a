"""Tests for src/retrieval/asmk.py and inverted_file.py: DELF-ASMK* against a direct NumPy
implementation on small cases, and the on-disk index (round trip, incremental add, streaming,
merging, rebuilding).

The direct implementation below follows the definitions literally (loops over words and
images, signs as +-1 vectors, distances by broadcasting) and shares no code with the module.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from model_utils.cli import InputError
from src.extraction.features import LocalFeatures, features_checksum
from src.extraction.store import FeatureStore
from src.retrieval import asmk
from src.retrieval import inverted_file as inverted_file_module
from src.retrieval.index_build import StoreSource, build_index, index_path_for, open_or_build_index
from src.retrieval.inverted_file import AsmkIndex

DIM = 40


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The direct implementation
# ----------------------------------------------------------------------------------------------


def direct_nearest_words(descriptors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    distances = ((descriptors[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(distances, axis=1, kind="stable")[:, :count]


def direct_aggregate(descriptors, assignments, centroids) -> dict[int, np.ndarray]:
    """word -> sum of (x - c_word) over the descriptors x assigned to the word."""
    sums = {}
    for word in sorted({int(w) for w in assignments.ravel() if w >= 0}):
        members = [i for i in range(len(descriptors)) if word in assignments[i]]
        sums[word] = sum(descriptors[i].astype(np.float64) - centroids[word] for i in members)
    return sums


def direct_kernel(u: np.ndarray, v: np.ndarray, alpha: float = 3.0, tau: float = 0.0) -> float:
    """sigma_alpha(sign(u).sign(v) / D) with sign = +1 for positive, -1 otherwise."""
    similarity = float(np.where(u > 0, 1, -1) @ np.where(v > 0, 1, -1)) / len(u)
    return float(np.sign(similarity) * abs(similarity) ** alpha) if similarity > tau else 0.0


def direct_scores(query, database, centroids, query_words=5) -> np.ndarray:
    """ASMK* similarity of the query to each database image, normalised by self-similarities."""
    query_sums = direct_aggregate(query, direct_nearest_words(query, centroids, query_words), centroids)
    scores = []
    for descriptors in database:
        if not len(descriptors):
            scores.append(0.0)
            continue
        image_sums = direct_aggregate(descriptors, direct_nearest_words(descriptors, centroids, 1), centroids)
        total = sum(direct_kernel(query_sums[w], image_sums[w]) for w in query_sums if w in image_sums)
        scores.append(total / np.sqrt(len(query_sums) * len(image_sums)))
    return np.array(scores)


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------


def test_aggregation_equals_direct_sums_with_multiple_assignment():
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(30, 12)).astype(np.float32)
    centroids = rng.normal(size=(6, 12)).astype(np.float32)
    assignments = np.array([rng.choice(6, 3, replace=False) for _ in range(30)])
    assignments[4, 2] = assignments[9, 0] = -1  # "no word" entries are skipped
    words, residuals = asmk.aggregate_residuals(descriptors, assignments, centroids)
    expected = direct_aggregate(descriptors, assignments, centroids)
    assert words.tolist() == list(expected)
    np.testing.assert_allclose(residuals, np.array(list(expected.values())), rtol=1e-5, atol=1e-5)
    # single assignment: a word's residual sums exactly its descriptors
    single = assignments[:, :1].copy()
    single[4] = 2
    words, residuals = asmk.aggregate_residuals(descriptors, single, centroids)
    expected = direct_aggregate(descriptors, single, centroids)
    assert words.tolist() == list(expected)
    np.testing.assert_allclose(residuals, np.array(list(expected.values())), rtol=1e-5, atol=1e-5)
    words, residuals = asmk.aggregate_residuals(descriptors[:0], assignments[:0], centroids)
    assert words.shape == (0,) and residuals.shape == (0, 12)


@pytest.mark.parametrize("dim", [12, 40])
def test_binarisation_packs_one_sign_bit_per_dimension(dim):
    rng = np.random.default_rng(1)
    residuals = rng.normal(size=(50, dim)).astype(np.float32)
    residuals[0, :3] = 0.0  # zero counts as not positive
    codes = asmk.binarize(residuals)
    assert codes.dtype == np.uint8 and codes.shape == (50, (dim + 7) // 8)
    bits = np.array([[(codes[r, j // 8] >> (7 - j % 8)) & 1 for j in range(8 * codes.shape[1])] for r in range(50)])
    np.testing.assert_array_equal(bits[:, :dim], residuals > 0)
    assert not bits[:, dim:].any()  # padding bits are 0


@pytest.mark.parametrize("dim", [12, 40, 1024])  # 1024: raw DELF descriptors, distances past 255
def test_binary_similarity_and_selective_kernel_equal_the_direct_kernel(dim):
    rng = np.random.default_rng(2)
    u = rng.normal(size=(300, dim))
    v = np.where(rng.random((300, 1)) < 0.5, u + rng.normal(size=(300, dim)) * 0.6, rng.normal(size=(300, dim)))
    similarity = asmk.binary_similarity(asmk.binarize(u), asmk.binarize(v), dim)
    expected = np.array([(np.where(a > 0, 1, -1) @ np.where(b > 0, 1, -1)) / dim for a, b in zip(u, v, strict=True)])
    np.testing.assert_allclose(similarity, expected, atol=1e-12)
    kernel = asmk.selective_kernel(similarity)
    np.testing.assert_allclose(kernel, [direct_kernel(a, b) for a, b in zip(u, v, strict=True)], atol=1e-12)
    hamming = asmk.hamming_distances(asmk.binarize(u), asmk.binarize(v))
    np.testing.assert_array_equal(asmk.kernel_of_hamming(dim)[hamming], kernel)  # the search's look-up
    assert (kernel[similarity <= 0] == 0).all() and (kernel[similarity > 0] > 0).all()
    # other exponent and threshold
    np.testing.assert_allclose(asmk.selective_kernel(np.array([-0.5, 0.0, 0.25, 0.5, 1.0]), 1.0, 0.3),
                               [0.0, 0.0, 0.0, 0.5, 1.0])
    assert asmk.selective_kernel(np.array([1.0]))[0] == 1.0  # a word's self-similarity


def test_multiple_assignment_gives_the_nearest_words_nearest_first():
    rng = np.random.default_rng(3)
    centroids = unit_rows(rng.normal(size=(64, DIM)))
    descriptors = unit_rows(rng.normal(size=(200, DIM)))
    codebook = asmk.Codebook(centroids)
    for count in (1, 5):
        np.testing.assert_array_equal(codebook.assign(descriptors, count),
                                      direct_nearest_words(descriptors, centroids, count))
    assert codebook.assign(descriptors, 100).shape == (200, 64)  # at most every word
    with pytest.raises(InputError, match="do not fit a 40-D codebook"):
        codebook.assign(np.ones((3, 8), np.float32), 1)


def test_two_level_codebook_sizes_and_exact_search_when_every_cell_is_probed(monkeypatch):
    monkeypatch.setattr(asmk, "FLAT_CODEBOOK_MAX", 16)
    rng = np.random.default_rng(4)
    sample = unit_rows(rng.normal(size=(3000, DIM)))
    codebook = asmk.train_codebook(sample, 100, seed=5)
    assert codebook.size == 100 and codebook.cells.shape == (16, DIM)  # 2^ceil(log2(100) / 2) cells
    again = asmk.train_codebook(sample, 100, seed=5)
    np.testing.assert_array_equal(codebook.centroids, again.centroids)  # seeded: reproducible
    queries = unit_rows(rng.normal(size=(300, DIM)))
    exact = direct_nearest_words(queries, codebook.centroids, 5)
    np.testing.assert_array_equal(codebook.assign(queries, 5, probes=16), exact)
    probed = codebook.assign(queries, 5, probes=4)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(probed, exact, strict=True)])
    assert 0.6 < recall < 1.0
    with pytest.raises(InputError, match="cannot train 100 words from a sample of shape"):
        asmk.train_codebook(sample[:50], 100)


def test_flat_codebook_is_kmeans_of_the_sample():
    rng = np.random.default_rng(6)
    centres = unit_rows(rng.normal(size=(8, DIM)))
    sample = (centres[rng.integers(0, 8, 2000)] + 0.01 * rng.normal(size=(2000, DIM))).astype(np.float32)
    codebook = asmk.train_codebook(sample, 8, seed=0)
    assert codebook.cells is None and codebook.size == 8
    # converged Lloyd iterations: every word is the mean of the sample points nearest to it
    nearest = direct_nearest_words(sample, codebook.centroids, 1)[:, 0]
    for word in np.unique(nearest):
        np.testing.assert_allclose(codebook.centroids[word], sample[nearest == word].mean(0), atol=1e-4)
    # and each word sits on a true centre (or between merged ones): no word is far from the data
    assert np.linalg.norm(centres[:, None] - codebook.centroids[None], axis=-1).min(0).max() < 1.0


def test_default_codebook_size():
    assert asmk.default_codebook_size(0) == asmk.default_codebook_size(1) == 16
    assert asmk.default_codebook_size(24) == 512  # 384 -> nearest power of two
    assert asmk.default_codebook_size(1000) == 16384
    assert asmk.default_codebook_size(5063) == asmk.default_codebook_size(1_000_000) == 65536


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


class SyntheticSource:
    """Database images in memory: views (noisy copies of part) of a few scenes, plus empties."""

    def __init__(self, num_images: int, seed: int = 0, dim: int = DIM) -> None:
        rng = np.random.default_rng(seed)
        scenes = [unit_rows(rng.normal(size=(120, dim))) for _ in range(4)]
        self.images = {}
        for i in range(num_images):
            if i % 7 == 6:
                self.images[f"image{i:03d}"] = np.zeros((0, dim), np.float32)
                continue
            scene = scenes[i % 4]
            chosen = rng.choice(120, int(rng.integers(20, 80)), replace=False)
            self.images[f"image{i:03d}"] = unit_rows(scene[chosen] + 0.15 * rng.normal(size=(len(chosen), dim)))
        self.reads: list[str] = []
        self.hash = "h1"

    def ids(self) -> list[str]:
        return list(self.images)

    def descriptors(self, image_id: str) -> np.ndarray:
        self.reads.append(image_id)
        return self.images[image_id]

    def content(self, image_id: str) -> tuple[str, str]:
        return self.hash, hashlib.sha256(self.images[image_id].tobytes()).hexdigest()

    def fingerprint(self) -> None:
        return None  # unknown: open_or_build_index checks every image's content each time


@pytest.fixture()
def source() -> SyntheticSource:
    return SyntheticSource(40)


def test_index_scores_equal_the_direct_implementation(tmp_path, source):
    index = build_index(tmp_path / "index", source, source.ids(), codebook_size=32)
    assert index.codebook.size == 32 and index.codebook.cells is None
    rng = np.random.default_rng(7)
    database = [source.images[i] for i in source.ids()]
    for query in (database[5][:30], unit_rows(rng.normal(size=(25, DIM))), database[0]):
        expected = direct_scores(query, database, index.codebook.centroids)
        np.testing.assert_allclose(index.scores(query), expected, rtol=1e-9, atol=1e-12)
    assert index.scores(np.zeros((0, DIM), np.float32)).tolist() == [0.0] * len(database)
    # an image's own descriptors score it highest (with a single assignment: its exact words)
    own = index.scores(database[9], assignments=1)
    assert own.argmax() == 9 and own[9] == pytest.approx(1.0)
    with pytest.raises(InputError, match="query descriptors are 8-D but the ASMK index .* holds 40-D"):
        index.scores(np.ones((3, 8), np.float32))


def test_round_trip_memory_mapped_and_without_pickles(tmp_path, source):
    built = build_index(tmp_path / "index", source, source.ids(), codebook_size=32)
    reopened = AsmkIndex.open(tmp_path / "index")
    assert reopened.image_ids == source.ids() and reopened.settings_hashes == ["h1"] * 40
    np.testing.assert_array_equal(reopened.codebook.centroids, built.codebook.centroids)
    for segment in reopened.segments:  # read-only views of file mappings
        for array in (segment.images, segment.codes):
            assert not array.flags.owndata and not array.flags.writeable and isinstance(array.base, np.memmap)
    for path in (tmp_path / "index").glob("*.npy"):
        np.load(path, allow_pickle=False)
    query = source.images["image010"][:40]
    np.testing.assert_array_equal(reopened.scores(query), built.scores(query))
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["codebook_size"] == 32 and meta["num_images"] == 40 and len(meta["segments"]) == 1
    # about 4 + ceil(40 / 8) bytes per (image, word) entry
    entries = sum(segment.num_entries for segment in reopened.segments)
    assert reopened.num_bytes() < 9 * entries + 8 * 33 * 40 + 40 * 100 + 4096
    assert AsmkIndex.open(tmp_path / "nothing") is None


def test_incremental_add_equals_building_at_once(tmp_path, source):
    ids = source.ids()
    whole = build_index(tmp_path / "whole", source, ids, codebook_size=32)
    part = AsmkIndex.create(tmp_path / "part", whole.codebook)  # same codebook, images added in two steps
    part.add(source, ids[:25])
    part.add(source, ids[20:])  # the overlap is not added twice
    assert part.image_ids == ids and len(part.segments) == 2
    reopened = AsmkIndex.open(tmp_path / "part")
    assert reopened.image_ids == ids
    for query in (source.images["image003"], source.images["image030"][:10]):
        np.testing.assert_allclose(reopened.scores(query), whole.scores(query), rtol=1e-12)
    reopened.merge()
    assert len(reopened.segments) == 1 and len(list((tmp_path / "part").glob("segment-*.codes.npy"))) == 1
    np.testing.assert_allclose(AsmkIndex.open(tmp_path / "part").scores(source.images["image003"]),
                               whole.scores(source.images["image003"]), rtol=1e-12)


def test_build_streams_and_buffers_a_bounded_number_of_entries(tmp_path, source, monkeypatch):
    monkeypatch.setattr(inverted_file_module, "SEGMENT_ENTRIES", 100)
    written = []
    real_flush = AsmkIndex._flush

    def recording_flush(index, buffer):
        written.append(sum(buffer["counts"]))
        return real_flush(index, buffer)

    monkeypatch.setattr(AsmkIndex, "_flush", recording_flush)
    index = build_index(tmp_path / "index", source, source.ids(), codebook_size=32)
    assert len(written) > 5 and max(written) < 100 + 32  # flushed whenever the buffer filled (<= 32 words an image)
    assert len(index.segments) == 1  # merged after the build
    # each image read once for indexing, plus the few read for the codebook sample
    assert all(source.reads.count(i) <= 2 for i in source.ids())
    reference = build_index(tmp_path / "reference", source, source.ids(), codebook_size=32)
    monkeypatch.setattr(inverted_file_module, "SEGMENT_ENTRIES", 1 << 23)
    np.testing.assert_allclose(index.scores(source.images["image001"]), reference.scores(source.images["image001"]))


def test_interrupted_add_keeps_committed_segments_and_resumes(tmp_path, source, monkeypatch):
    monkeypatch.setattr(inverted_file_module, "SEGMENT_ENTRIES", 300)
    monkeypatch.setattr(inverted_file_module, "ADD_BATCH", 4)  # images read (and lost when killed) at once
    whole = build_index(tmp_path / "whole", source, source.ids(), codebook_size=32)

    class Failing(SyntheticSource):
        def descriptors(self, image_id):
            if image_id == "image030":
                raise KeyboardInterrupt
            return source.images[image_id]

    failing = Failing(0)
    failing.images = source.images
    index = AsmkIndex.create(tmp_path / "index", whole.codebook)
    with pytest.raises(KeyboardInterrupt):
        index.add(failing, source.ids())
    committed = AsmkIndex.open(tmp_path / "index").image_ids
    assert 0 < len(committed) <= 30 and committed == source.ids()[: len(committed)]
    resumed = open_or_build_index(tmp_path / "index", source, source.ids())
    assert resumed.image_ids == source.ids()
    np.testing.assert_allclose(resumed.scores(source.images["image002"]), whole.scores(source.images["image002"]))
    assert not list((tmp_path / "index").glob(".*"))  # no temporaries left


def test_open_or_build_adds_missing_images_and_rebuilds_stale_ones(tmp_path, source, caplog):
    ids = source.ids()
    first = open_or_build_index(tmp_path / "index", source, ids[:30])
    centroids = first.codebook.centroids.copy()
    # 30 images -> default 512 words, lowered to a power of two the sample can train
    assert first.codebook.size == 256
    grown = open_or_build_index(tmp_path / "index", source, ids)
    np.testing.assert_array_equal(grown.codebook.centroids, centroids)  # the codebook is kept
    assert grown.image_ids == ids
    # a subset of the indexed images: nothing to do
    assert open_or_build_index(tmp_path / "index", source, ids[:5]).image_ids == ids
    source.hash = "h2"  # features extracted again with other settings
    with caplog.at_level("WARNING", logger="delf.retrieval"):
        rebuilt = open_or_build_index(tmp_path / "index", source, ids[:10])
    assert "extracted again" in caplog.text and rebuilt.image_ids == ids[:10]
    assert open_or_build_index(tmp_path / "index", source, ids[:10], codebook_size=8).codebook.size == 8
    with pytest.raises(InputError, match="codebook_size 5000 needs at least as many database descriptors"):
        build_index(tmp_path / "index", source, ids, codebook_size=5000)


def write_stores(paths, source, settings_hash="h1"):
    """source's images spread over feature stores, image k in store k % len(paths)."""
    for k, path in enumerate(paths):
        with FeatureStore(path) as store:
            for image_id in source.ids()[k :: len(paths)]:
                descriptors = source.images[image_id]
                ones = np.ones(len(descriptors), np.float32)
                store.put(image_id, LocalFeatures(np.zeros((len(descriptors), 2), np.float32), ones, descriptors,
                                                  ones), image_size=(9, 9), settings_hash=settings_hash)


def test_settings_are_read_again_only_when_a_store_changed(tmp_path, source, monkeypatch):
    """At R1M, reading every image's checksum on each open would take minutes: an index remembers
    the stores' state when it last compared them all, and reads the checksums only after a change."""
    paths = [tmp_path / "worker0.h5", tmp_path / "worker1.h5"]
    write_stores(paths, source)
    ids = source.ids()
    reads = []
    content = FeatureStore.content
    monkeypatch.setattr(FeatureStore, "content", lambda store, image_id: reads.append(image_id)
                        or content(store, image_id))

    def open_index(subset=ids):
        reads.clear()
        stores = [FeatureStore(path) for path in paths]
        index = open_or_build_index(tmp_path / "index", StoreSource(stores), subset, codebook_size=16)
        for store in stores:
            store.close()
        return index

    built = open_index()
    assert len(reads) == len(ids)  # the build records every image's settings and checksum
    assert open_index().image_ids == ids and reads == []  # unchanged stores: nothing read
    assert open_index(ids[:5]).image_ids == ids and reads == []

    with FeatureStore(paths[1]) as store:  # one image extracted again with the same settings
        store.put(ids[1], store.get(ids[1]), image_size=(9, 9), settings_hash="h1")
    open_index(ids[:5])
    assert reads == ids[:5]  # a subset is checked, so the new state is not recorded yet...
    open_index()
    assert sorted(reads) == sorted(ids)  # ...until every indexed image has been checked against it
    reopened = open_index()
    assert reads == [] and reopened.codebook.size == built.codebook.size
    assert AsmkIndex.open(tmp_path / "index").source_fingerprint == StoreSource(
        [FeatureStore(path) for path in paths]).fingerprint()

    with FeatureStore(paths[0]) as store:  # other settings: noticed, and the index rebuilt
        store.put(ids[2], store.get(ids[2]), image_size=(9, 9), settings_hash="h2")
    rebuilt = open_index()
    assert rebuilt.settings_hashes[rebuilt.number_of[ids[2]]] == "h2" and open_index().image_ids == ids
    assert reads == []


def test_bad_indexes_and_inputs_are_one_line_errors(tmp_path, source):
    build_index(tmp_path / "index", source, source.ids(), codebook_size=16)
    (tmp_path / "index" / "index.json").write_text("{not json")
    with pytest.raises(InputError, match=r"ASMK index .* is damaged .*index\.json is unreadable.*; delete"):
        AsmkIndex.open(tmp_path / "index")
    wrong = SyntheticSource(30, dim=24)
    index = build_index(tmp_path / "other", source, source.ids()[:10], codebook_size=16)
    with pytest.raises(InputError, match=r"descriptors of 'image021' have shape \(\d+, 24\), but the ASMK index"):
        index.add(wrong, ["image021"])
    empty = SyntheticSource(0)
    empty.images = {"a": np.zeros((0, DIM), np.float32)}
    with pytest.raises(InputError, match="no descriptors to train an ASMK codebook"):
        build_index(tmp_path / "empty", empty, ["a"])


def test_store_source_reads_several_feature_stores(tmp_path, source):
    """One store per extraction worker: the index is built from all of them."""
    ids = source.ids()
    paths = [tmp_path / "worker0.h5", tmp_path / "worker1.h5"]
    write_stores(paths, source)
    with FeatureStore(paths[0]) as first, FeatureStore(paths[1]) as second:
        stores = StoreSource([first, second])
        assert "image001" in stores and "ghost" not in stores
        index = build_index(tmp_path / "from_stores", stores, ids, codebook_size=32)
    reference = build_index(tmp_path / "from_memory", source, ids, codebook_size=32)
    np.testing.assert_array_equal(index.codebook.centroids, reference.codebook.centroids)
    np.testing.assert_allclose(index.scores(source.images["image004"]), reference.scores(source.images["image004"]))
    assert index_path_for(paths[0]) == tmp_path / "worker0.h5.asmk"


def test_feature_less_images_are_indexed_without_entries(tmp_path, source):
    codebook = build_index(tmp_path / "whole", source, source.ids(), codebook_size=16).codebook
    empties = [i for i in source.ids() if not len(source.images[i])]
    index = AsmkIndex.create(tmp_path / "empty", codebook)
    index.add(source, empties[:2])
    index.add(source, empties[2:])
    index.merge()  # two segments without a single entry
    reopened = AsmkIndex.open(tmp_path / "empty")
    assert reopened.image_ids == empties and len(reopened.segments) == 1
    assert reopened.scores(source.images["image000"]).tolist() == [0.0] * len(empties)


def test_store_source_content_is_the_store_checksum_wherever_the_image_is(tmp_path, source):
    """The index keys images on the store's per-image checksum: the same in a journal entry, in the
    compacted HDF5 file, and computed from the data for images stored before checksums existed."""
    path = tmp_path / "features.h5"
    descriptors = source.images["image001"]
    ones = np.ones(len(descriptors), np.float32)
    features = LocalFeatures(np.zeros((len(descriptors), 2), np.float32), ones, descriptors, ones)
    store = FeatureStore(path)
    store.put("image001", features, image_size=(9, 9), settings_hash="h1")
    in_journal = StoreSource([store]).content("image001")
    store.close()  # compacts
    with FeatureStore(path) as store:
        compacted = StoreSource([store]).content("image001")
    assert compacted == in_journal == ("h1", features_checksum(features, (9, 9), "h1"))
    with h5py.File(path, "r+") as h5:  # as a store written before checksums existed
        del h5["image001"].attrs["checksum"]
    with FeatureStore(path) as store:
        assert store.content("image001") == ("h1", None)
        assert StoreSource([store]).content("image001") == in_journal


# ----------------------------------------------------------------------------------------------
# Frequent words: the stop list and the assignment share
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def crowded(monkeypatch) -> tuple[SyntheticSource, np.ndarray]:
    """40 images, 30 of which also show one generic structure (a descriptor near `structure`)."""
    monkeypatch.setattr(inverted_file_module, "POPULATED_MIN_ENTRIES", 5)  # a small index has statistics too
    source = SyntheticSource(40, seed=11)
    rng = np.random.default_rng(12)
    structure = unit_rows(rng.normal(size=(1, DIM)))
    for image_id in source.ids()[:30]:
        generic = unit_rows(structure + 0.01 * rng.normal(size=(1, DIM)))
        source.images[image_id] = np.concatenate([source.images[image_id], generic])
    return source, structure


def test_a_stop_word_changes_nothing_for_the_images_without_it(tmp_path, crowded):
    source, structure = crowded
    index = build_index(tmp_path / "index", source, source.ids(), codebook_size=256)
    crowded_word = int(index.codebook.assign(structure, 1)[0, 0])
    assert index.word_counts[crowded_word] >= 30 and index.word_counts.max() == index.word_counts[crowded_word]
    queries = ("image001", "image035", "image017")
    unpruned = [index.scores(source.images[i]) for i in queries]
    unpruned_words = [index.query_words(source.images[i])[0] for i in queries]
    index.set_stop_words(0.5)
    np.testing.assert_array_equal(index.stop_words, [crowded_word])  # the one over-populated word
    without = np.array([crowded_word not in asmk.image_words(source.images[i], index.codebook, 1,
                                                              asmk.DATABASE_PROBES)[0] for i in source.ids()])
    assert 3 <= without.sum() < 40
    for query, before, before_words in zip(queries, unpruned, unpruned_words, strict=True):
        after = index.scores(source.images[query])
        order = np.lexsort((np.arange(without.sum()), -after[without]))
        np.testing.assert_array_equal(order, np.lexsort((np.arange(without.sum()), -before[without])))
        # the same scores but for the query's normalisation, which counts the stop word no more
        after_words = index.query_words(source.images[query])[0]
        assert after_words.tolist() == [w for w in before_words.tolist() if w != crowded_word]
        scale = np.sqrt(len(after_words) / len(before_words))
        np.testing.assert_allclose(after[without] * scale, before[without], rtol=1e-12)
        if crowded_word in before_words:  # the images with the word changed
            assert not np.allclose(after * scale, before)
    # The pruned scores are those of a query without the word (direct implementation), normalised
    # by all of each image's words.
    query = source.images["image001"]
    words = direct_nearest_words(query, index.codebook.centroids, 5)
    kept = direct_aggregate(query, np.where(words == crowded_word, -1, words), index.codebook.centroids)
    database = [source.images[i] for i in source.ids()]
    expected = []
    for descriptors in database:
        image_sums = direct_aggregate(descriptors, direct_nearest_words(descriptors, index.codebook.centroids, 1),
                                      index.codebook.centroids) if len(descriptors) else {}
        total = sum(direct_kernel(kept[w], image_sums[w]) for w in kept if w in image_sums)
        expected.append(total / np.sqrt(len(kept) * len(image_sums)) if image_sums else 0.0)
    np.testing.assert_allclose(index.scores(query), expected, rtol=1e-9, atol=1e-12)


def test_the_stop_list_round_trips_through_the_saved_index(tmp_path, crowded):
    source, _ = crowded
    index = open_or_build_index(tmp_path / "index", source, source.ids(), codebook_size=256, stop_word_share=0.5)
    assert len(index.stop_words) == 1
    reopened = AsmkIndex.open(tmp_path / "index")
    assert reopened.stop_word_share == 0.5
    np.testing.assert_array_equal(reopened.stop_words, index.stop_words)
    np.testing.assert_array_equal(reopened.scores(source.images["image003"]), index.scores(source.images["image003"]))
    # another share: decided again from the statistics, and recorded
    assert len(open_or_build_index(tmp_path / "index", source, source.ids(), stop_word_share=0.05).stop_words) > 1
    assert AsmkIndex.open(tmp_path / "index").stop_word_share == 0.05
    assert len(open_or_build_index(tmp_path / "index", source, source.ids(), stop_word_share=1.0).stop_words) == 0
    # and a merge decides it again with the recorded share, from the merged statistics
    index = open_or_build_index(tmp_path / "index", source, source.ids(), stop_word_share=0.5)
    part = AsmkIndex.create(tmp_path / "part", index.codebook)
    part.add(source, source.ids()[:20])
    part.set_stop_words(0.5)
    part.add(source, source.ids()[20:])
    part.merge()
    np.testing.assert_array_equal(AsmkIndex.open(tmp_path / "part").stop_words, index.stop_words)
    stop_words_file = tmp_path / "index" / "stop_words.npy"  # checked like every index file
    stop_words_file.write_bytes(stop_words_file.read_bytes()[:-1] + b"\x01")
    with pytest.raises(InputError, match=r"stop_words\.npy fails its checksum"):
        AsmkIndex.open(tmp_path / "index")


def test_populated_words_are_searched_only_as_a_descriptors_nearest_word(tmp_path, crowded):
    source, _ = crowded
    index = build_index(tmp_path / "index", source, source.ids(), codebook_size=256)
    populated = index.populated_words(0.2)
    assert 0 < populated.sum() < 256
    query = source.images["image002"]
    nearest = direct_nearest_words(query, index.codebook.centroids, 5)
    allowed = np.where((np.arange(5) > 0) & populated[nearest], -1, nearest)
    expected = direct_aggregate(query, allowed, index.codebook.centroids)
    words, codes = index.query_words(query, 5, assignment_share=0.2)
    assert words.tolist() == list(expected)
    np.testing.assert_array_equal(codes, asmk.binarize(np.array(list(expected.values()))))
    assert set(index.query_words(query, 5)[0].tolist()) > set(words.tolist())  # share 1: every assigned word
