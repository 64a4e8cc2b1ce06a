"""src/extract_feature.py: image loading, the pyramid, and properties that hold for any weights.

No trained DELF weights exist offline, so the network is seeded-random. Checks rely on what any
CNN guarantees: translation equivariance (a crop shifted by a multiple of the stride 32 maps back
exactly) and the pyramid (an exact 2x downscale is the original's 0.5 level).
"""

import logging

import mindspore
import numpy as np
import pytest
from PIL import Image
from stride_shift import assert_stride_shift_recovered

from model_utils.config import ExtractionConfig
from src.extraction.extractor import DelfExtractor, ExtractionReport, extract, extract_to_store
from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import fit_image_size
from src.extraction.store import FeatureStore
from src.matching.verify import match_features
from src.model.network import DelfModel

# Keep every cell (softplus >= 0): random weights give small attention scores.
KEEP_ALL = dict(score_threshold=0.0, use_pca=False)


@pytest.fixture(scope="module")
def model():
    mindspore.set_seed(0)
    network = DelfModel("test")
    network.set_train(False)
    return network


@pytest.fixture(scope="module")
def photo(images_dir):
    return load_image(images_dir / "sacre_coeur1.jpg")


def test_translation_by_stride_multiples_is_recovered_exactly(model, photo):
    config = ExtractionConfig(image_scales=(1.0,), **KEEP_ALL)
    result = assert_stride_shift_recovered(photo, model, config, min_inliers=40)
    residuals = np.abs(result.inliers_1 - result.inliers_2 - np.array([64.0, 96.0]))
    assert residuals.max() < 2.0


def test_exact_downscale_recovers_scale_two_through_the_pyramid(model, photo):
    config = ExtractionConfig(image_scales=(0.25, 0.5, 1.0), **KEEP_ALL)
    image = photo[:384, :512]
    half = resize_image(image, 192, 256)
    features, features_half = extract([image, half], model, config)
    result = match_features(features, features_half)
    assert result.num_inliers > 30
    np.testing.assert_allclose(result.transform[:, :2], 0.5 * np.eye(2), atol=0.01)
    # The matched keypoints come from levels one octave apart.
    _, index = _nearest(features.locations, result.inliers_1)
    _, index_half = _nearest(features_half.locations, result.inliers_2)
    ratios = features.scales[index] / features_half.scales[index_half]
    assert np.median(ratios) == pytest.approx(2.0)


def _nearest(locations, points):
    distances = np.linalg.norm(locations[None] - points[:, None], axis=2)
    return distances.min(axis=1), distances.argmin(axis=1)


def test_unrelated_images_match_far_less(model, photo, images_dir):
    config = ExtractionConfig(image_scales=(1.0,), **KEEP_ALL)
    other = load_image(images_dir / "squirrel_cls.jpg")[:320, :448]
    image = photo[:320, :448]
    related = match_features(*extract([image, image[64:, 96:]], model, config))
    unrelated = match_features(*extract([image, other], model, config))
    assert unrelated.num_inliers * 4 < related.num_inliers


def test_locations_are_in_original_pixels_and_sorted_by_attention(model, photo):
    config = ExtractionConfig(image_scales=(0.5, 1.0), max_feature_num=50, **KEEP_ALL)
    image = photo[:200, :300]
    (features,) = extract([image], model, config)
    assert features.locations.shape == (50, 2) and features.descriptors.shape == (50, 1024)
    assert np.all(np.diff(features.attention) <= 0)
    assert set(np.unique(features.scales)) <= {1.0, 2.0}
    # Keypoint centres sit on the stride-32 grid of their level, in (y, x) order.
    at_full = features.locations[features.scales == 1.0]
    np.testing.assert_allclose(np.mod(at_full, 32.0), 0.0, atol=1e-4)
    assert at_full[:, 0].max() < 200 and at_full[:, 1].max() < 300
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)


def test_tiny_image_gives_empty_features(model):
    config = ExtractionConfig(**KEEP_ALL)
    (features,) = extract([np.zeros((5, 5, 3), np.uint8)], model, config)
    assert features.locations.shape == (0, 2) and features.descriptors.shape == (0, 1024)


def test_zero_surviving_keypoints_warns_with_name_and_threshold(model, photo, caplog):
    config = ExtractionConfig(image_scales=(1.0,), score_threshold=1e9, use_pca=False)
    extractor = DelfExtractor(model, config)
    with caplog.at_level(logging.WARNING, logger="delf.extract"):
        features = extractor(photo[:100, :100], name="sacre_coeur1.jpg")
    assert len(features.locations) == 0
    assert "sacre_coeur1.jpg" in caplog.text and "score_threshold 1e+09" in caplog.text


def test_too_large_for_the_top_scale_is_downscaled_with_a_warning(caplog):
    config = ExtractionConfig(max_pixels_per_scale=1_000_000)
    with caplog.at_level(logging.WARNING, logger="delf.extract"):
        factor = fit_image_size(2000, 3000, config, "big.jpg")
    assert (2000 * factor * 2.0) * (3000 * factor * 2.0) == pytest.approx(1_000_000, rel=1e-6)
    assert "big.jpg" in caplog.text and "downscaled" in caplog.text
    assert fit_image_size(100, 100, ExtractionConfig(max_image_size=50)) == 0.5
    assert fit_image_size(100, 80, ExtractionConfig(min_image_size=200)) == 2.0


def _save(image, path):
    image.save(path)
    return path


def test_store_resumes_without_recomputing(tmp_path, model, photo):
    config = ExtractionConfig(image_scales=(0.5,), **KEEP_ALL)
    paths = {}
    for index in range(3):
        paths[f"img{index}"] = _save(Image.fromarray(photo[index * 20:index * 20 + 96, :128]),
                                     tmp_path / f"img{index}.png")
    extractor = DelfExtractor(model, config)
    calls = []
    original = extractor.image_features
    extractor.image_features = lambda inputs, name="": calls.append(name) or original(inputs, name)
    with FeatureStore(tmp_path / "f.h5") as store:
        assert extract_to_store(dict(list(paths.items())[:2]), store, extractor, "hash-a", progress=False) == \
            ExtractionReport(extracted=2, skipped=0)
    with FeatureStore(tmp_path / "f.h5") as store:
        counts = extract_to_store(paths, store, extractor, "hash-a", progress=False)
        assert counts == ExtractionReport(extracted=1, skipped=2)
        assert len(calls) == 3
        counts = extract_to_store(paths, store, extractor, "hash-b", progress=False)
        assert counts == ExtractionReport(extracted=3, skipped=0)
        assert store.image_ids() == ["img0", "img1", "img2"]
