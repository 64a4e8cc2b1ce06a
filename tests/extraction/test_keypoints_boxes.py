"""Box list and box ops against brute-force pure-Python versions."""

import numpy as np
import pytest

from src.extraction.geometry import box_centers
from src.extraction.keypoints import BoxList, iou, non_max_suppression, receptive_boxes


def brute_iou(a, b):
    """IoU of two [ymin, xmin, ymax, xmax] boxes, one pair at a time in plain Python."""
    inter_h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_h * inter_w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_nms(boxes, scores, threshold, max_output):
    """Textbook greedy NMS: repeatedly take the best remaining box (lowest index on ties)."""
    remaining = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    while remaining and len(kept) < max_output:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [i for i in remaining if brute_iou(boxes[best], boxes[i]) <= threshold]
    return kept


def random_boxes(rng, count, extent=100.0):
    corners = rng.uniform(0, extent, size=(count, 2, 2))
    sizes = rng.uniform(0, extent / 3, size=(count, 2))
    boxes = np.concatenate([corners[:, 0], corners[:, 0] + sizes], axis=1)
    boxes[:3, 2:] = boxes[:3, :2]  # a few degenerate (zero-area) boxes
    return boxes


def test_receptive_boxes_match_a_loop_over_cells():
    height, width, rf, stride, padding = 3, 4, 291.0, 32.0, 145.0
    expected = [
        [
            stride * y - padding,
            stride * x - padding,
            stride * y - padding + rf - 1,
            stride * x - padding + rf - 1,
        ]
        for y in range(height)
        for x in range(width)
    ]
    np.testing.assert_array_equal(receptive_boxes(height, width, rf, stride, padding), expected)
    # DELF's padding is (rf - 1) / 2, so cell (y, x) is centred on stride * (y, x).
    np.testing.assert_array_equal(
        box_centers(receptive_boxes(height, width, rf, stride, padding))[5], [32.0, 32.0]
    )
    assert receptive_boxes(0, 5, rf, stride, padding).shape == (0, 4)


def test_box_centers_are_yx():
    np.testing.assert_array_equal(box_centers(np.array([[0.0, 10.0, 4.0, 30.0]])), [[2.0, 20.0]])


def test_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 40), random_boxes(rng, 30)
    expected = [[brute_iou(x, y) for y in b] for x in a]
    result = iou(a, b)
    assert result.shape == (40, 30)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.diag(iou(a[3:], a[3:])), 1.0)  # non-degenerate boxes overlap themselves
    assert iou(a[:0], b).shape == (0, 30)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("seed", range(5))
def test_greedy_nms_matches_brute_force(threshold, seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 150)
    scores = rng.integers(0, 20, size=150).astype(float)  # many ties
    for max_output in (0, 1, 7, 1000):
        kept = non_max_suppression(boxes, scores, threshold, max_output)
        assert kept.tolist() == brute_nms(boxes, scores, threshold, max_output)


def test_nms_keeps_box_whose_iou_equals_threshold():
    boxes = np.array([[0.0, 0.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]])  # IoU exactly 1/3
    assert non_max_suppression(boxes, np.array([2.0, 1.0]), 1 / 3, 10).tolist() == [0, 1]
    assert non_max_suppression(boxes, np.array([2.0, 1.0]), 0.33, 10).tolist() == [0]


def test_top_k_path_is_stable_sort_by_score():
    rng = np.random.default_rng(1)
    boxes = np.tile([[0.0, 0.0, 10.0, 10.0]], (500, 1))  # identical boxes: only top-k can keep them all
    scores = rng.integers(0, 50, size=500).astype(np.float32)
    expected = sorted(range(500), key=lambda i: (-scores[i], i))
    assert non_max_suppression(boxes, scores, 1.0, 100).tolist() == expected[:100]
    assert non_max_suppression(boxes, scores, 1.0, 10_000).tolist() == expected
    assert non_max_suppression(boxes[:0], scores[:0], 1.0, 5).shape == (0,)
    assert non_max_suppression(boxes[:0], scores[:0], 0.5, 5).shape == (0,)


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        non_max_suppression(np.zeros((2, 4)), np.array([1.0, np.nan]), 0.5, 2)
    with pytest.raises(ValueError, match="shape|need"):
        non_max_suppression(np.zeros((2, 4)), np.array([1.0]), 0.5, 2)


def test_box_list_fields_and_gather():
    boxes = BoxList(np.arange(12).reshape(3, 4))
    boxes.add_field("scores", np.array([0.1, 0.9, 0.5]))
    boxes.add_field("descriptors", np.arange(6).reshape(3, 2))
    subset = boxes.gather(np.array([2, 0]))
    assert len(subset) == 2 and subset.boxes.dtype == np.float64
    np.testing.assert_array_equal(subset.boxes, [[8, 9, 10, 11], [0, 1, 2, 3]])
    np.testing.assert_array_equal(subset.get_field("scores"), [0.5, 0.1])
    np.testing.assert_array_equal(subset.get_field("descriptors"), [[4, 5], [0, 1]])
    with pytest.raises(KeyError, match="no field 'missing'"):
        subset.get_field("missing")
    with pytest.raises(ValueError, match="needs 3 entries"):
        boxes.add_field("bad", np.zeros(2))
    with pytest.raises(KeyError, match="no field"):
        boxes.get_field("missing")
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        BoxList(np.zeros((3, 3)))
