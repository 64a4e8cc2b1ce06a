"""The prefetch thread of extract_to_store: order, bounded look-ahead, errors, and the same features."""

import threading

import numpy as np
import pytest
from PIL import Image

from model_utils.config import ExtractionConfig
from src.extraction.extractor import DelfExtractor, extract_to_store, prefetched
from src.extraction.images import load_image
from src.extraction.store import FeatureStore


def _prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_results_come_in_order_and_the_look_ahead_is_bounded(depth):
    prepared = []
    ahead_of_first = threading.Event()

    def prepare(item):
        prepared.append(item)
        if item == depth + 1:
            ahead_of_first.set()
        return item * 10

    results = []
    for index, value in enumerate(prefetched(range(12), prepare, depth)):
        if index == 0 and depth:
            # While the first result is in use, the thread prepares the next ones on its own.
            assert ahead_of_first.wait(timeout=60)
        # At most `depth` results wait in the queue, plus one the thread holds while the queue is full.
        assert len(prepared) <= index + 1 + depth + (1 if depth else 0)
        results.append(value)
    assert results == [item * 10 for item in range(12)]
    assert not _prefetch_threads()


def test_an_unexpected_error_reaches_the_caller_in_its_place():
    def prepare(item):
        if item == 2:
            raise TypeError("bug in prepare")
        return item

    seen = []
    with pytest.raises(TypeError, match="bug in prepare"):
        for value in prefetched(range(5), prepare, 1):
            seen.append(value)
    assert seen == [0, 1]
    assert not _prefetch_threads()


def test_a_consumer_that_stops_early_ends_the_thread():
    values = prefetched(range(1000), lambda item: item, 2)
    assert next(values) == 0
    values.close()
    assert not _prefetch_threads()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images_dir):
    """Four small images, the third one corrupt."""
    root = tmp_path_factory.mktemp("prefetch_images")
    photo = load_image(images_dir / "sacre_coeur1.jpg")
    for index in range(4):
        Image.fromarray(photo[index * 40:index * 40 + 100 + 10 * index, :140]).save(root / f"img{index}.png")
    (root / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_prefetching_changes_nothing_in_the_features_or_the_failure_report(random_model, folder, tmp_path):
    config = ExtractionConfig(image_scales=(0.5, 1.0), score_threshold=0.0, use_pca=False)
    extractor = DelfExtractor(random_model, config)
    paths = {f"img{index}": folder / f"img{index}.png" for index in range(4)}
    boxes = {"img1": [10, 5, 110, 90]}  # crops are made in the prefetch thread too
    stores, reports = [], []
    for depth in (0, 1):
        store = FeatureStore(tmp_path / f"prefetch{depth}.h5")
        reports.append(extract_to_store(paths, store, extractor, "h", crops=boxes, progress=False, prefetch=depth))
        stores.append(store)
    assert reports[0] == reports[1]
    assert reports[1].extracted == 3 and list(reports[1].failed) == ["img2"]
    assert str(folder / "img2.png") in reports[1].failed["img2"]
    for image_id in ("img0", "img1", "img3"):
        for without, with_prefetch in zip(stores[0].get(image_id), stores[1].get(image_id), strict=True):
            np.testing.assert_array_equal(without, with_prefetch)
        assert stores[0].attributes(image_id) == stores[1].attributes(image_id)
    assert stores[1].attributes("img1")["image_size"] == (85, 100)
    assert stores[1].attributes("img3")["image_size"] == (130, 140)
    for store in stores:
        store.close()
