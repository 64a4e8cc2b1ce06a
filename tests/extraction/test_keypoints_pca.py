"""Keypoint selection and descriptor post-processing: hand-built cases and brute-force loops."""

import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction.keypoints import select_keypoints
from src.extraction.pca import PcaParameters, load_pca, postprocess_descriptors
from src.extraction.pyramid import PyramidLevel


def coded_features(level, depth, height, width):
    """features[d, y, x] = 1000 * level + 100 * d + 10 * y + x: each value says where it came from."""
    d, y, x = np.meshgrid(np.arange(depth), np.arange(height), np.arange(width), indexing="ij")
    return (1000 * level + 100 * d + 10 * y + x).astype(np.float32)


def test_hand_built_two_level_pyramid():
    # Default receptive field 291 / stride 32 / padding 145: cell (y, x) is centred on 32 * (y, x)
    # in the level's pixels, i.e. 32 * (y / scale_y, x / scale_x) in the original image.
    level0 = PyramidLevel(
        scale=1.0,
        scale_yx=(1.0, 1.0),
        attention=np.array([[150.0, 50.0, 120.0], [90.0, 300.0, 100.0]]),
        features=coded_features(0, 3, 2, 3),
    )
    level1 = PyramidLevel(
        scale=0.5,
        scale_yx=(0.5, 0.4),
        attention=np.array([[200.0, 10.0], [99.9, 250.0]]),
        features=coded_features(1, 3, 2, 2),
    )
    config = ExtractionConfig(score_threshold=100.0, max_feature_num=5)
    locations, descriptors, scales, attention = select_keypoints([level0, level1], config)

    # Six cells reach 100 (>= keeps the 100.0 one); the top five by attention survive.
    np.testing.assert_array_equal(attention, [300, 250, 200, 150, 120])
    np.testing.assert_array_equal(locations, [[32, 32], [64, 80], [0, 0], [0, 0], [0, 64]])
    np.testing.assert_array_equal(scales, [1, 2, 2, 1, 1])
    cell_codes = [11, 1011, 1000, 0, 2]  # 1000 * level + 10 * y + x of each survivor
    np.testing.assert_array_equal(descriptors, np.add.outer(cell_codes, [0, 100, 200]))
    assert all(a.dtype == np.float32 for a in (locations, descriptors, scales, attention))

    # With NMS at IoU 0.5: level-0 boxes (290 px) one cell apart overlap by IoU 0.66-0.80, so the
    # 300 box removes 150, 120 and 100; the 250 box (580 x 725 px, containing the 300 box: IoU 0.2)
    # stays and removes the 200 box beside it (IoU 0.65).
    _, _, _, nms_attention = select_keypoints([level0, level1], ExtractionConfig(iou_threshold=0.5))
    np.testing.assert_array_equal(nms_attention, [300, 250])


def brute_force_select(levels, config):
    """Loop over every cell of every level, then greedy NMS in plain Python."""
    candidates = []
    for level in levels:
        sy, sx = level.scale_yx
        height, width = level.attention.shape
        for y in range(height):
            for x in range(width):
                if level.attention[y, x] >= config.score_threshold:
                    ymin = (config.stride * y - config.padding) / sy
                    xmin = (config.stride * x - config.padding) / sx
                    ymax = (config.stride * y - config.padding + config.receptive_field - 1) / sy
                    xmax = (config.stride * x - config.padding + config.receptive_field - 1) / sx
                    candidates.append(
                        (
                            (ymin, xmin, ymax, xmax),
                            level.attention[y, x],
                            level.features[:, y, x],
                            level.scale,
                        )
                    )
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i][1])  # sorted() is stable

    def overlap(a, b):
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = []
    for i in order:
        if len(kept) == config.max_feature_num:
            break
        if all(overlap(candidates[i][0], candidates[k][0]) <= config.iou_threshold for k in kept):
            kept.append(i)
    boxes = [candidates[i][0] for i in kept]
    return (
        np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]).reshape(-1, 2),
        np.array([candidates[i][2] for i in kept]).reshape(len(kept), -1),
        np.array([1 / candidates[i][3] for i in kept]),
        np.array([candidates[i][1] for i in kept]),
    )


@pytest.mark.parametrize("iou_threshold", [1.0, 0.6])
@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force_on_random_maps(iou_threshold, seed):
    rng = np.random.default_rng(seed)
    original = (480, 640)
    levels = []
    for scale in (0.5, 0.7071, 1.0):
        size = np.round(np.array(original) * scale).astype(int)
        height, width = -(-size // 32)  # the feature map of a stride-32 network
        attention = rng.integers(0, 300, size=(height, width)).astype(np.float32)  # ties across levels
        levels.append(
            PyramidLevel(scale, tuple(size / original), attention, rng.normal(size=(8, height, width)))
        )
    config = ExtractionConfig(score_threshold=150.0, max_feature_num=60, iou_threshold=iou_threshold)
    result = select_keypoints(levels, config)
    expected = brute_force_select(levels, config)
    assert result[0].shape[0] == expected[0].shape[0] > 0
    for got, want in zip(result, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_nothing_selected_gives_empty_arrays():
    level = PyramidLevel(1.0, (1.0, 1.0), np.zeros((2, 2)), np.ones((16, 2, 2)))
    locations, descriptors, scales, attention = select_keypoints([level], ExtractionConfig())
    assert locations.shape == (0, 2) and descriptors.shape == (0, 16)
    assert scales.shape == (0,) and attention.shape == (0,)
    assert select_keypoints([], ExtractionConfig())[1].shape == (0, 1024)


def test_bad_levels_raise_input_error():
    transposed = PyramidLevel(1.0, (1.0, 1.0), np.zeros((2, 3)), np.zeros((4, 3, 2)))
    with pytest.raises(InputError, match="do not match"):
        select_keypoints([transposed], ExtractionConfig())
    broken = PyramidLevel(1.0, (1.0, 1.0), np.full((1, 1), np.nan), np.zeros((4, 1, 1)))
    with pytest.raises(InputError, match="NaN"):
        select_keypoints([broken], ExtractionConfig())
    with pytest.raises(InputError, match="positive"):
        select_keypoints([broken._replace(scale_yx=(0.0, 1.0))], ExtractionConfig())


def normalize(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_postprocess_matches_hand_formula():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(20, 6))
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    pca = PcaParameters(mean=rng.normal(size=6) * 0.1, projection=basis.T, variances=np.arange(1.0, 7.0))
    expected = normalize((normalize(raw) - pca.mean) @ basis[:, :3])
    np.testing.assert_allclose(postprocess_descriptors(raw, pca, 3, False), expected, rtol=1e-5, atol=1e-6)
    whitened = normalize((normalize(raw) - pca.mean) @ basis[:, :3] / np.sqrt([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(postprocess_descriptors(raw, pca, 3, True), whitened, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(postprocess_descriptors(raw, None, 3, False), normalize(raw), rtol=1e-6)
    assert postprocess_descriptors(raw, pca, 3, False).dtype == np.float32


def test_postprocess_zero_rows_and_empty_input():
    pca = PcaParameters(np.zeros(4), np.eye(4), np.ones(4))
    out = postprocess_descriptors(np.zeros((2, 4)), pca, 2, True)
    assert np.isfinite(out).all() and out.shape == (2, 2)
    assert np.isfinite(postprocess_descriptors(np.zeros((2, 4)), None, 2, False)).all()
    assert postprocess_descriptors(np.zeros((0, 4)), pca, 2, False).shape == (0, 2)
    assert postprocess_descriptors(np.zeros((0, 4)), None, 2, False).shape == (0, 4)
    with pytest.raises(InputError, match="5-D"):
        postprocess_descriptors(np.zeros((1, 5)), pca, 2, False)
    with pytest.raises(InputError, match="variances"):
        postprocess_descriptors(np.ones((1, 4)), pca._replace(variances=None), 2, True)


def write_pca(directory, depth, rows, *, variances=True):
    np.save(directory / "mean.npy", np.zeros(depth, np.float32))
    np.save(directory / "proj.npy", np.eye(depth, dtype=np.float32)[:rows])
    if variances:
        np.save(directory / "var.npy", np.ones(depth, np.float32))
    return ExtractionConfig(
        feature_depth=depth,
        pca_dim=3,
        use_whitening=True,
        pca_mean_path=str(directory / "mean.npy"),
        pca_projection_path=str(directory / "proj.npy"),
        pca_variances_path=str(directory / "var.npy"),
    )


def test_load_pca_checks_files(tmp_path):
    params = load_pca(write_pca(tmp_path, 8, 8))
    assert params.mean.shape == (8,) and params.projection.shape == (8, 8) and params.variances.shape == (8,)

    with pytest.raises(InputError, match=r"proj\.npy has shape \(2, 8\)"):
        load_pca(write_pca(tmp_path, 8, 2))
    config = write_pca(tmp_path, 8, 8)
    with pytest.raises(InputError, match=r"mean\.npy has shape \(8,\), expected \(16,\)"):
        load_pca(ExtractionConfig(**{**config.__dict__, "feature_depth": 16}))
    (tmp_path / "var.npy").unlink()
    with pytest.raises(InputError, match=r"var\.npy not found: run scripts/download_pretrained\.sh.*fit_pca"):
        load_pca(config)
    assert load_pca(ExtractionConfig(**{**config.__dict__, "use_whitening": False})).variances is None
    np.save(tmp_path / "mean.npy", np.array([{"pickled": 1}], dtype=object))
    with pytest.raises(InputError, match=r"mean\.npy cannot be read"):
        load_pca(config)


def test_load_pca_reads_tf_datum_files(tmp_path):
    from src.model.datum_io import write_datum

    write_datum(tmp_path / "mean.datum", np.arange(4, dtype=np.float32))
    write_datum(tmp_path / "proj.datum", np.eye(4, dtype=np.float32))
    config = ExtractionConfig(
        feature_depth=4,
        pca_dim=2,
        pca_mean_path=str(tmp_path / "mean.datum"),
        pca_projection_path=str(tmp_path / "proj.datum"),
    )
    params = load_pca(config)
    np.testing.assert_array_equal(params.mean, [0, 1, 2, 3])
    np.testing.assert_array_equal(params.projection, np.eye(4))
