"""The two pyramid geometries (src/extraction/geometry.py) on hand-computed cases, and that stores of the
old tf_legacy geometry are redone while pillow stores stay valid.

The tf_legacy rule is proven equal to TF1 DELF's extractor end to end in
tests/model/test_tf_delf_extraction.py (TensorFlow itself, every side 10-8192); here are the cases
issue 19 measured, computed by hand from TF's code.
"""

import numpy as np
import pytest
from PIL import Image

from model_utils.config import ExtractionConfig
from src.extraction.geometry import feature_scales, level_size, map_cell_boxes, resized_size
from src.extraction.keypoints import receptive_boxes, select_keypoints
from src.extraction.pyramid import PyramidLevel, needed_image_size, pyramid_inputs, pyramid_plan
from src.extraction.store import FeatureStore, LocalFeatures

TF = ExtractionConfig(resize="tf_legacy")


def test_level_sides_round_the_float32_product_half_to_even():
    # float32(4662) * float32(0.7071) is 3296.5 exactly (float64: 3296.5002): TF rounds to even.
    assert level_size(4662, 4662, 0.7071, "tf_legacy") == (3296, 3296)
    assert level_size(4662, 4662, 0.7071, "pillow") == (3297, 3297)
    for side, level in ((2331, 3296), (6824, 9650), (7162, 10128)):
        assert level_size(side, 10, 1.4142, "tf_legacy")[0] == level
        assert level_size(side, 10, 1.4142, "pillow")[0] == level + 1
    assert level_size(361, 482, 0.25, "tf_legacy") == (90, 120)  # 90.25, 120.5 -> 120 (even)
    with pytest.raises(ValueError, match="factor 1"):
        level_size(361, 482, 0.25, "tf_legacy", factor=0.5)


def test_feature_scales_are_the_float32_division():
    assert feature_scales(0.3536, 2, "tf_legacy").tolist() == [np.float32(2.8280544)] * 2
    assert feature_scales(0.3536, 1, "pillow")[0] == np.float32(2.8280542)  # 1 ulp apart
    assert feature_scales(0.3536, 1, "tf_legacy").dtype == np.float32


def test_locations_divide_by_the_nominal_scale_then_by_the_resize_factors():
    # Width 482 at scale 0.25 is a 120 px level; cell x = 3 has its box centre at 96 px there.
    cell = receptive_boxes(1, 4, 291, 32, 145)[3:]
    assert cell[0, 1::2].mean() == 96
    _, tf_location = map_cell_boxes(cell, 0.25, (90 / 361, 120 / 482), (1.0, 1.0), "tf_legacy")
    _, pillow_location = map_cell_boxes(cell, 0.25, (90 / 361, 120 / 482), (1.0, 1.0), "pillow")
    assert tf_location[0, 1] == 384.0  # TF: 96 / 0.25
    assert pillow_location[0, 1] == pytest.approx(385.6)  # 96 / (120 / 482): where the cell lies
    # With TF's ResizeImage first, the centre is divided by its factors (float64, as TF's numpy).
    boxes, resized = map_cell_boxes(cell, 0.25, (0.0, 0.0), (0.5, 0.8), "tf_legacy")
    assert boxes.dtype == np.float32 and resized[0, 1] == np.float32(384.0 / 0.8)


def test_tf_legacy_resizes_first_and_checks_the_minimum_side_after():
    config = ExtractionConfig(resize="tf_legacy", max_image_size=301)
    plan = pyramid_plan(283, 377, config)
    assert plan.base_size == resized_size(283, 377, 301 / 377) == (226, 301)  # round(225.95), ResizeImage
    assert plan.resize_yx == (226 / 283, 301 / 377)
    assert plan.levels[0] == (0.25, 56, 75) and plan.levels[-1] == (2.0, 452, 602)  # of 226 x 301
    assert pyramid_plan(283, 377, ExtractionConfig(max_image_size=301)).levels[0] == (0.25, 56, 75)
    assert pyramid_plan(283, 377, ExtractionConfig(max_image_size=301)).resize_yx == (1.0, 1.0)
    # An 8 px image enlarged to 40 px by min_image_size has features in TF; pillow checks the original.
    assert pyramid_plan(8, 6, ExtractionConfig(resize="tf_legacy", min_image_size=40)).levels
    assert not pyramid_plan(8, 6, ExtractionConfig(min_image_size=40)).levels
    for resize in ("pillow", "tf_legacy"):  # a query box outside its image gives an empty crop
        assert pyramid_plan(0, 50, ExtractionConfig(resize=resize, max_image_size=20)).levels == []


def test_tf_legacy_pyramid_is_built_from_the_pillow_resized_image():
    image = np.random.default_rng(0).integers(0, 256, (283, 377, 3), dtype=np.uint8)
    levels = pyramid_inputs(image, ExtractionConfig(resize="tf_legacy", max_image_size=301, image_scales=(1.0, 0.5)))
    resized = np.asarray(Image.fromarray(image).resize((301, 226), Image.BILINEAR))  # TF's ResizeImage
    expected = pyramid_inputs(resized, ExtractionConfig(resize="tf_legacy", image_scales=(1.0, 0.5)))
    assert [level.image.shape[2:] for level in levels] == [(226, 301), (113, 150)]
    for level, reference in zip(levels, expected, strict=True):
        np.testing.assert_array_equal(level.image, reference.image)
        assert level.resize_yx == (226 / 283, 301 / 377) and reference.resize_yx == (1.0, 1.0)


def test_tf_legacy_decodes_in_full_and_may_run_unbounded():
    # pillow decodes a JPEG reduced when the top level needs no more; TF resizes the full decode.
    assert needed_image_size(1600, 2400, ExtractionConfig(max_image_size=400)) == (533, 800)
    assert needed_image_size(1600, 2400, ExtractionConfig(max_image_size=400, resize="tf_legacy")) == (1600, 2400)
    unbounded = ExtractionConfig(resize="tf_legacy", max_pixels_per_scale=-1)
    assert pyramid_plan(1200, 1600, unbounded).levels[-1] == (2.0, 2400, 3200)  # TF never downscales
    with pytest.raises(ValueError, match="or -1 for no bound"):
        ExtractionConfig(max_pixels_per_scale=0)


def test_keypoint_selection_follows_the_configured_rule():
    # One level at scale 0.25 of a 361 x 482 image (90 x 120), a single cell above the threshold: x = 3.
    attention = np.zeros((3, 4))
    attention[1, 3] = 1.0
    level = PyramidLevel(0.25, (90 / 361, 120 / 482), attention, np.ones((2, 3, 4)), resize_yx=(0.5, 1.0))
    locations, _, scales, _ = select_keypoints([level], ExtractionConfig(resize="tf_legacy", score_threshold=0.5))
    np.testing.assert_array_equal(locations, [[32 / 0.25 / 0.5, 384.0]])
    assert scales.tolist() == [np.float32(4.0)]
    locations, _, _, _ = select_keypoints([level], ExtractionConfig(score_threshold=0.5))
    np.testing.assert_allclose(locations, [[32 * 361 / 90, 96 * 482 / 120]], rtol=1e-7)  # resize_yx unused


def test_stores_of_the_old_tf_legacy_geometry_are_redone_and_pillow_stores_kept(tmp_path):
    # Hashes the code before issue 19 gave (commit 0d89da6) for checkpoint id "ck".
    old_pillow, old_tf_legacy = "35fc6d9922050d6c", "ebfb797c3f34a9c9"
    assert ExtractionConfig().settings_hash("ck") == old_pillow  # pillow features did not change
    assert TF.settings_hash("ck") != old_tf_legacy
    features = LocalFeatures(np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.ones((1, 40), np.float32),
                             np.ones(1, np.float32))
    with FeatureStore(tmp_path / "features.h5") as store:
        store.put("pillow_image", features, image_size=(10, 10), settings_hash=old_pillow)
        store.put("tf_image", features, image_size=(10, 10), settings_hash=old_tf_legacy)
        assert store.is_done("pillow_image", ExtractionConfig().settings_hash("ck"))
        assert not store.is_done("tf_image", TF.settings_hash("ck"))  # a resumed run extracts it again
