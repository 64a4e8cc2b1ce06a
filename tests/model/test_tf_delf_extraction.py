"""An imported TF DELF model gives TF1 DELF's own features, end to end (issue 19).

tf_reference/tf_extractor.py rebuilds TF's whole extraction in TensorFlow, as the TF1 extractor
runs it (the release graph of feature_extractor.py: pyramid by resize_bilinear, threshold,
receptive boxes divided by the scale, NMS / top-k over all scales; examples/extractor.py:
locations divided by ResizeImage's factors, L2, PCA from the `.datum` files, L2), writes the
releases delf_v1_20171026 and delf_gld_20190411 as TF1 SavedModels with random weights and a
random PCA each, and extracts real photos with odd sides. The converter imports both releases
(presets delf_v1 and delf_gld) and this suite extracts the same photos with the presets' settings.
The project itself never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tf_venv
from PIL import Image

from model_utils.config import get_config
from src.extraction.extractor import DelfExtractor, features_from_levels
from src.extraction.geometry import level_size
from src.extraction.images import crop_to_box, load_image
from src.extraction.pca import load_pca
from src.extraction.store import LocalFeatures
from src.model.tf_delf import import_release
from src.model.weights import build_extraction_model, load_weights

pytestmark = pytest.mark.slow

GENERATOR = Path(__file__).parent / "tf_reference" / "tf_extractor.py"
RELEASES = {"delf_v1_20171026": 40, "delf_gld_20190411": 128}  # release folder -> PCA dimension
MAX_FEATURE_NUM = 1000
LOCATION_TOLERANCE = 1e-3  # px
# The network's float error in attention (measured up to 2.1e-5 for values in (0.01, 6); relative
# error ~1e-6 of the largest value, tests/model/test_tf_delf_import.py). Values closer than twice
# that are ties, which either implementation may order either way.
ATTENTION_TOLERANCE = 5e-5
TIE = 2 * ATTENTION_TOLERANCE


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    photo: str
    size: tuple[int, int]  # (h, w) of the image extracted: the photo resized, or cropped with `crop`
    target: int  # about this many cells pass the threshold TF picks
    crop: tuple[int, int, int, int] | None = None  # [x1, y1, x2, y2] of the photo
    max_image_size: int = -1


CASES = (
    Case("cap", "sacre_coeur2.jpg", (361, 482), target=1300),  # 1429 cells: 1300 pass, the cap keeps 1000
    Case("threshold", "building.jpg", (301, 403), target=700),  # 1006 cells: the threshold keeps ~700
    # TF resizes with Pillow first (226x301, factors 0.7986 / 0.7984), then builds the pyramid
    Case("max_image_size", "all_souls_000013.jpg", (283, 377), target=400, crop=(201, 315, 578, 598),
         max_image_size=301),
)


def case_image(case: Case, images_dir: Path) -> np.ndarray:
    photo = load_image(images_dir / case.photo)
    if case.crop is not None:
        image = crop_to_box(photo, case.crop)
    else:
        image = np.asarray(Image.fromarray(photo).resize(case.size[::-1], Image.BILINEAR))
    assert image.shape[:2] == case.size
    return image


def tf_resize_image(image: np.ndarray, max_image_size: int) -> tuple[np.ndarray, list[float]]:
    """examples/extractor.py ResizeImage (max_image_size only), rewritten from its source: Pillow
    bilinear to int(round(side * factor)); returns the image and its scale_factors (h, w)."""
    height, width = image.shape[:2]
    largest_side = max(height, width)
    if not 0 <= max_image_size < largest_side:
        return image, [1.0, 1.0]
    factor = max_image_size / largest_side
    new_shape = (int(round(width * factor)), int(round(height * factor)))
    resized = np.array(Image.fromarray(image).resize(new_shape, resample=Image.BILINEAR))
    return resized, [new_shape[1] / height, new_shape[0] / width]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images_dir) -> Path:
    """The releases TensorFlow wrote and what its extractor gives on every case."""
    directory = tmp_path_factory.mktemp("tf_extraction")
    cases = []
    for case in CASES:
        image = case_image(case, images_dir)
        np.save(directory / f"{case.name}.npy", image)
        resized, scale_factors = tf_resize_image(image, case.max_image_size)
        np.save(directory / f"{case.name}_tf_input.npy", resized)
        cases.append({"name": case.name, "image": str(directory / f"{case.name}_tf_input.npy"),
                      "scale_factors": scale_factors, "target": case.target})
    config = get_config([]).extraction
    spec = {"scales": list(config.image_scales), "max_feature_num": MAX_FEATURE_NUM, "pca_dims": RELEASES,
            "cases": cases}
    (directory / "spec.json").write_text(json.dumps(spec))
    tf_venv.run_tensorflow(GENERATOR, str(directory), str(directory / "spec.json"))
    return directory


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    """Both releases imported by the converter: {release: ImportResult}."""
    out = tmp_path_factory.mktemp("imported")
    results = {release: import_release(reference / release / "model", out / f"{release}.ckpt")
               for release in RELEASES}
    assert [result.preset for result in results.values()] == ["delf_v1", "delf_gld"]  # from the folder names
    return results


@pytest.fixture(scope="module")
def ours(reference, imported):
    """This suite's features of every case with each release's preset: {case: {release: LocalFeatures}}.

    The two releases hold the same network (TF wrote one graph twice; checked below), so the pyramid
    runs once per case and each preset's keypoint selection and PCA are applied to it, as
    DelfExtractor.features does.
    """
    first, second = (load_weights(result.ckpt_path).tensors for result in imported.values())
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    configs = {release: get_config(["--config_path", str(result.preset_path)]) for release, result in imported.items()}
    v1 = configs["delf_v1_20171026"]
    model = build_extraction_model(v1, str(imported["delf_v1_20171026"].ckpt_path))
    features = {}
    for case in CASES:
        threshold = float(np.load(reference / f"{case.name}.npz")["threshold"])
        case_configs = {release: dataclasses.replace(config.extraction, score_threshold=threshold,
                                                     max_image_size=case.max_image_size)
                        for release, config in configs.items()}
        extractor = DelfExtractor(model, case_configs["delf_v1_20171026"])
        levels = extractor.pyramid(np.load(reference / f"{case.name}.npy"), case.name)
        features[case.name] = {release: features_from_levels(levels, extraction, load_pca(extraction), case.name)
                               for release, extraction in case_configs.items()}
    return features


def test_presets_are_the_releases_settings(imported):
    for release, result in imported.items():
        extraction = get_config(["--config_path", str(result.preset_path)]).extraction
        assert extraction.resize == "tf_legacy" and extraction.pca_dim == RELEASES[release]
        assert extraction.max_pixels_per_scale == -1  # TF's extractor never downscales
        assert (extraction.max_image_size, extraction.min_image_size) == (-1, -1)
        assert extraction.image_scales == (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
        assert (extraction.max_feature_num, extraction.iou_threshold, extraction.use_whitening) == (1000, 1.0, False)


def match_cells(actual: LocalFeatures, expected: dict) -> np.ndarray:
    """For each of our features, the index of TF's feature of the same cell (same scale, location
    within LOCATION_TOLERANCE; distinct cells of one level lie >= 16 px apart), or -1."""
    matches = np.full(len(actual.locations), -1)
    for index, (location, scale) in enumerate(zip(actual.locations, actual.scales, strict=True)):
        candidates = np.flatnonzero(expected["scales"] == scale)
        if candidates.size:
            distances = np.abs(expected["locations"][candidates] - location).max(axis=1)
            if distances.min() <= LOCATION_TOLERANCE:
                matches[index] = candidates[np.argmin(distances)]
    return matches


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
@pytest.mark.parametrize("release", RELEASES)
def test_features_equal_tensorflows(case, release, reference, ours):
    expected = dict(np.load(reference / f"{case.name}.npz"))
    actual = ours[case.name][release]
    # The case does what it is named for: the cap or the threshold decides how many features remain,
    # and the threshold lies well away from every cell's attention.
    passing, threshold, every_cell = int(expected["cells_passing"]), expected["threshold"], expected["all_attention"]
    assert passing == np.count_nonzero(every_cell >= threshold)
    assert np.abs(every_cell - threshold).min() > 2 * TIE
    if case.name == "cap":
        assert passing > MAX_FEATURE_NUM and len(expected["attention"]) == MAX_FEATURE_NUM
    else:
        assert passing < MAX_FEATURE_NUM and len(expected["attention"]) == passing
    assert len(set(expected["scales"].tolist())) == 7  # every pyramid level contributes

    assert len(actual.locations) == len(expected["locations"])
    matches = match_cells(actual, expected)
    matched = matches >= 0
    assert len(set(matches[matched].tolist())) == np.count_nonzero(matched)
    # Every feature is TF's, at TF's rank, except where attention values tie to within the network's
    # float error: neighbours may trade places, and at the 1000-feature cap one such cell may take
    # the other's place.
    boundary = expected["attention"][-1]
    lost = np.setdiff1d(np.arange(len(expected["attention"])), matches[matched])
    assert np.all(np.abs(actual.attention[~matched] - boundary) <= TIE), "features TF does not have"
    assert np.all(np.abs(expected["attention"][lost] - boundary) <= TIE), "TF's features missing"
    assert len(lost) <= 1
    rank_moves = np.abs(expected["attention"][matches[matched]] - expected["attention"][matched])
    assert rank_moves.max() <= TIE, "order differs beyond ties"

    ours_matched = np.flatnonzero(matched)
    theirs = matches[matched]
    np.testing.assert_array_equal(actual.scales[ours_matched], expected["scales"][theirs])  # float32, exactly
    location_error = np.abs(actual.locations[ours_matched] - expected["locations"][theirs]).max()
    assert location_error <= LOCATION_TOLERANCE
    np.testing.assert_allclose(actual.attention[ours_matched], expected["attention"][theirs], rtol=0,
                               atol=ATTENTION_TOLERANCE)
    descriptors = expected[f"descriptors_{release}"][theirs]
    assert actual.descriptors.shape == (len(actual.locations), RELEASES[release])
    cosine = np.sum(actual.descriptors[ours_matched] * descriptors, axis=1) / (
        np.linalg.norm(actual.descriptors[ours_matched], axis=1) * np.linalg.norm(descriptors, axis=1))
    assert cosine.min() >= 0.99999
    print(f"{release} {case.name}: {len(actual.locations)} features ({passing} cells pass), "
          f"{np.count_nonzero(theirs != ours_matched)} at another rank among ties, {len(lost)} exchanged at the "
          f"cap; locations within {location_error:.1e} px, min cosine {cosine.min():.7f}")


def test_level_sides_equal_tensorflows(reference):
    """TF's tf.round(float32(side) * float32(scale)) for every side 10-8192 at the release's scales."""
    expected = np.load(reference / "level_sides.npz")
    scales = get_config([]).extraction.image_scales
    for scale, sides in zip(scales, expected["level_sides"], strict=True):
        ours = [level_size(side, side, scale, "tf_legacy")[0] for side in expected["sides"].tolist()]
        np.testing.assert_array_equal(ours, sides, err_msg=f"scale {scale}")
