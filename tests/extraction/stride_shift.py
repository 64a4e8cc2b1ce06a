"""A property any CNN extractor has, whatever its weights: a crop shifted by whole cells of the
stride-32 grid maps back exactly (shared by the DELF and DELG extraction tests)."""

import numpy as np

from src.extraction.extractor import extract
from src.matching.verify import MatchResult, match_features


def assert_stride_shift_recovered(image: np.ndarray, model, config, min_inliers: int) -> MatchResult:
    """Match `image`[:320, :448] against itself shifted by 2 and 3 cells: identity linear part, exact shift."""
    image = image[:320, :448]
    shifted = image[64:, 96:]  # 2 and 3 cells of the stride-32 grid
    features, features_shifted = extract([image, shifted], model, config)
    result = match_features(features, features_shifted, residual_threshold=20.0)
    assert result.num_inliers > min_inliers
    # image (x, y) -> shifted (x - 96, y - 64)
    np.testing.assert_allclose(result.transform[:, :2], np.eye(2), atol=1e-3)
    np.testing.assert_allclose(result.transform[:, 2], [-96.0, -64.0], atol=0.1)
    return result
