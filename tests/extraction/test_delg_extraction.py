"""DELG extraction (src/extraction/extractor.py with a DelgModel): one pass over the pyramid gives the
local features and the global descriptor, checked against NumPy recomputations from the network's
own per-level outputs, and properties that hold for any weights (seeded-random here)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image
from stride_shift import assert_stride_shift_recovered

from model_utils.cli import InputError
from model_utils.config import ConfigError, ExtractionConfig, get_config
from src.extraction.extractor import DelfExtractor, ExtractionReport, extract_to_store
from src.extraction.images import load_image
from src.extraction.pyramid import pyramid_inputs
from src.extraction.store import FeatureStore
from src.model.network import min_input_side
from src.model.weights import build_extraction_model, checkpoint_id

# What a DELG model's extraction settings must say: its local descriptors are the 128-D autoencoder code, no PCA.
DELG_EXTRACTION = dict(use_pca=False, feature_depth=128)
# Global descriptor from 0.7071, 1.0 and 1.4142 (TF DELG's image_scales_ind 3, 4, 5 of its 7 scales).
PYRAMID = ExtractionConfig(image_scales=(0.5, 0.7071, 1.0, 1.4142), global_scale_indices=(1, 2, 3),
                           score_threshold=1.0, max_feature_num=10_000, **DELG_EXTRACTION)
GLOBAL_SCALES = (0.7071, 1.0, 1.4142)


@pytest.fixture(scope="module")
def photo(images_dir):
    return load_image(images_dir / "sacre_coeur1.jpg")[60:220, 100:324]  # 160 x 224


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def photo_run(random_delg_model, photo):
    """(extracted ImageFeatures, {scale: (level input, attention, code, raw global)}) of the photo: the
    network's outputs computed here level by level, apart from the extractor."""
    extractor = DelfExtractor(random_delg_model, PYRAMID)
    features = extractor.image_features(extractor.inputs(photo))
    outputs = {}
    for level in pyramid_inputs(photo, PYRAMID, min_side=min_input_side("keras")):
        attention, code, global_raw = (out.asnumpy()[0] for out in random_delg_model(Tensor(level.image)))
        outputs[level.scale] = (level, attention[0], code, global_raw)
    return features, outputs


def test_global_descriptor_is_the_normalised_sum_of_the_global_levels(photo_run):
    features, outputs = photo_run
    assert sorted(outputs) == [0.5, *GLOBAL_SCALES]
    expected = unit(unit(np.stack([outputs[scale][3] for scale in GLOBAL_SCALES])).sum(axis=0))
    got = features.global_descriptor
    assert got.dtype == np.float32 and got.shape == (2048,)
    assert np.linalg.norm(got.astype(np.float64)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # The choice of levels shows: with the 0.5 level too, or one level alone, the descriptor differs.
    every_level = unit(unit(np.stack([output[3] for output in outputs.values()])).sum(axis=0))
    assert np.abs(every_level - expected).max() > 1e-4
    assert np.abs(unit(outputs[1.0][3]) - expected).max() > 1e-4


def test_local_descriptors_are_the_normalised_code_at_the_selected_cells(photo_run):
    features, outputs = photo_run
    local = features.local
    above = {scale: np.argwhere(output[1] >= PYRAMID.score_threshold) for scale, output in outputs.items()}
    total_cells = sum(output[1].size for output in outputs.values())
    assert 0 < len(local.locations) == sum(map(len, above.values())) < total_cells  # every cell >= threshold
    assert local.descriptors.shape == (len(local.locations), 128)
    assert np.all(np.diff(local.attention) <= 0)
    for scale, (level, attention, code, _) in outputs.items():
        at_level = np.flatnonzero(np.isclose(local.scales, 1.0 / scale))
        assert len(at_level) == len(above[scale])
        # Receptive-box centres: cell (y, x) sits at 32 * (y, x) in the level's pixels.
        cells = np.rint(local.locations[at_level] * np.array(level.scale_yx) / 32.0).astype(int)
        assert sorted(map(tuple, cells)) == sorted(map(tuple, above[scale]))
        np.testing.assert_array_equal(local.attention[at_level], attention[cells[:, 0], cells[:, 1]])
        expected = unit(code[:, cells[:, 0], cells[:, 1]].T)
        np.testing.assert_allclose(local.descriptors[at_level], expected, atol=1e-6)


def test_global_descriptor_depends_only_on_the_global_levels(random_delg_model, photo, photo_run):
    """Other levels, the order of the indices and the local-feature settings leave it bit for bit alone."""
    other = dataclasses.replace(PYRAMID, image_scales=GLOBAL_SCALES, global_scale_indices=(2, 0, 1),
                                score_threshold=1e9, max_feature_num=1)
    extractor = DelfExtractor(random_delg_model, other)
    features = extractor.image_features(extractor.inputs(photo))
    assert len(features.local.locations) == 0
    np.testing.assert_array_equal(features.global_descriptor, photo_run[0].global_descriptor)


def test_stride_aligned_crop_matches_back(random_delg_model, images_dir):
    """A crop shifted by a multiple of the stride maps back exactly (cells far enough from the border to
    see no padding in their 291-px receptive field have equal codes)."""
    config = dataclasses.replace(PYRAMID, image_scales=(1.0,), global_scale_indices=(0,), score_threshold=0.0)
    image = load_image(images_dir / "sacre_coeur1.jpg")
    assert_stride_shift_recovered(image, random_delg_model, config, min_inliers=30)


def test_settings_delg_cannot_use_are_refused_in_one_line(random_delg_model):
    with pytest.raises(InputError, match="is a DELG model: its local descriptors are the autoencoder's code, used "
                                         "without PCA; set extraction.use_pca false"):
        DelfExtractor(random_delg_model, dataclasses.replace(PYRAMID, use_pca=True))
    with pytest.raises(ConfigError, match=r"global_scale_indices \[1, 4\]: index 4 is past the 4 image_scales"):
        DelfExtractor(random_delg_model, dataclasses.replace(PYRAMID, global_scale_indices=(1, 4)))


def _save(array, path):
    Image.fromarray(array).save(path)
    return path


def test_store_holds_the_global_descriptor_and_resumes_on_the_settings(random_delg_model, random_delg_checkpoint,
                                                                       random_checkpoint, photo, tmp_path):
    config = dataclasses.replace(PYRAMID, image_scales=(0.7071, 1.0), global_scale_indices=(0, 1))
    paths = {f"img{index}": _save(photo[index * 30:index * 30 + 96, :128], tmp_path / f"img{index}.png")
             for index in range(2)}
    extractor = DelfExtractor(random_delg_model, config)
    settings_hash = config.settings_hash(checkpoint_id(str(random_delg_checkpoint)))
    with FeatureStore(tmp_path / "f.h5") as store:
        assert extract_to_store(paths, store, extractor, settings_hash, progress=False) == \
            ExtractionReport(extracted=2, skipped=0)
        for image_id, path in paths.items():
            direct = extractor.image_features(extractor.file_inputs(path)[0])
            np.testing.assert_array_equal(store.global_descriptor(image_id), direct.global_descriptor)
            stored = store.get(image_id)
            np.testing.assert_array_equal(stored.locations, direct.local.locations)
            np.testing.assert_array_equal(stored.descriptors, direct.local.descriptors)
        assert extract_to_store(paths, store, extractor, settings_hash, progress=False) == \
            ExtractionReport(extracted=0, skipped=2)
    # What changes DELG features changes the hash: its global levels, and the weights (DELF or DELG).
    other_scales = dataclasses.replace(config, global_scale_indices=(1,))
    other_hash = other_scales.settings_hash(checkpoint_id(str(random_delg_checkpoint)))
    assert len({settings_hash, other_hash, config.settings_hash(checkpoint_id(str(random_checkpoint)))}) == 3
    with FeatureStore(tmp_path / "f.h5") as store:
        report = extract_to_store({"img0": paths["img0"]}, store, DelfExtractor(random_delg_model, other_scales),
                                  other_hash, progress=False)
        assert report == ExtractionReport(extracted=1, skipped=0)
        level_one = extractor.pyramid(load_image(paths["img0"]))[1]
        assert level_one.scale == 1.0
        np.testing.assert_allclose(store.global_descriptor("img0"), unit(level_one.global_descriptor), atol=1e-6)


def test_an_image_too_small_for_the_global_scales_fails_and_is_not_stored(random_delg_model, photo, tmp_path):
    # 0.25 of 16 px is 4 px, under the 5 px the Keras backbone needs: the level is skipped, and it is the
    # only global one. The image is reported, named, and never stored; the others go on.
    config = dataclasses.replace(PYRAMID, image_scales=(0.25, 1.0), global_scale_indices=(0,))
    paths = {"tiny": _save(photo[:16, :16], tmp_path / "tiny.png"), "fine": _save(photo[:40, :40], tmp_path / "f.png")}
    with FeatureStore(tmp_path / "f.h5") as store:
        report = extract_to_store(paths, store, DelfExtractor(random_delg_model, config), "hash", progress=False)
        assert report.extracted == 1 and list(report.failed) == ["tiny"]
        assert report.failed["tiny"].startswith(str(paths["tiny"]))
        assert "no global descriptor: none of the global scales 0.25 could run" in report.failed["tiny"]
        assert store.image_ids() == ["fine"]


@pytest.mark.slow
def test_cli_in_graph_mode_stores_the_pynative_features(random_delg_model, random_delg_checkpoint, photo, tmp_path):
    """src.extract_feature with a DELG checkpoint and its default graph mode (compiled once for every image
    size): the store holds PyNative's features bit for bit, under the settings hash of the checkpoint."""
    config = dataclasses.replace(PYRAMID, image_scales=GLOBAL_SCALES, global_scale_indices=(0, 1, 2))
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {"a": _save(photo[:120, :160], folder / "a.png"), "b": _save(photo[63:160, 91:222], folder / "b.png")}
    command = [sys.executable, "-m", "src.extract_feature", "--images_path", str(folder), "--output_path",
               str(tmp_path / "f.h5"), "--ckpt_path", str(random_delg_checkpoint), "--log_path=",
               "--device_target=CPU", "--extraction.feature_depth=128", "--extraction.use_pca=false",
               "--extraction.image_scales=[0.7071,1.0,1.4142]", "--extraction.global_scale_indices=[0,1,2]",
               f"--extraction.score_threshold={config.score_threshold}",
               f"--extraction.max_feature_num={config.max_feature_num}"]
    root = Path(__file__).resolve().parents[2]
    environment = dict(os.environ, GLOG_v="3")
    for expected in ("2 images extracted, 0 already done", "0 images extracted, 2 already done"):
        done = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    extractor = DelfExtractor(random_delg_model, config)
    with FeatureStore(tmp_path / "f.h5") as store:
        for image_id, path in paths.items():
            direct = extractor.image_features(extractor.file_inputs(path)[0])
            np.testing.assert_array_equal(store.global_descriptor(image_id), direct.global_descriptor)
            for got, want in zip(store.get(image_id), direct.local, strict=True):
                np.testing.assert_array_equal(got, want)
            assert store.attributes(image_id)["settings_hash"] == config.settings_hash(
                checkpoint_id(str(random_delg_checkpoint)))


def test_delg_config_overlay_is_what_a_trained_delg_checkpoint_needs(random_delg_checkpoint):
    """delg_config.yaml (the README's DELG settings) builds the extraction network of a DELG checkpoint;
    without it the default DELF settings are refused in one line that names it."""
    root = Path(__file__).resolve().parents[2]
    config = get_config(["--config_path", str(root / "delg_config.yaml")])
    assert (config.extraction.feature_depth, config.extraction.use_pca, config.retrieval.mode) == (128, False, "global")
    assert build_extraction_model(config, str(random_delg_checkpoint)).kind == "delg"
    with pytest.raises(InputError, match="local descriptors are 128-D.*pass --config_path delg_config.yaml"):
        build_extraction_model(get_config([]), str(random_delg_checkpoint))
