"""Geometric verification of two images' DELF features: KD-tree putative matches + affine RANSAC.

Putative matches follow the reference: every image-2 descriptor takes its nearest image-1
descriptor when it is closer than `distance_threshold` (Euclidean on L2-normalised descriptors).
An affine model is then fitted by RANSAC with one of two engines:

- "opencv"  (default): cv2.estimateAffine2D, compiled and much faster (bench/match.py measures
  by how much), the nearest-neighbour search then being most of the step's time.
- "skimage": skimage.measure.ransac + AffineTransform, the reference's own estimator.

Unlike the reference, RANSAC is seeded, so the same inputs always give the same inlier count,
and samples whose points are collinear are skipped by both engines (the reference's skimage call
would fit them and count every point on that line as an inlier).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import ransac
from skimage.transform import AffineTransform

from model_utils.cli import InputError
from model_utils.config import MatchingConfig
from src.extraction.features import Keypoints, LocalFeatures

# Matching reads only locations and descriptors: full features, or the store's keypoints() read.
Features = LocalFeatures | Keypoints
ENGINES = ("opencv", "skimage")
NN_METHODS = ("kdtree", "brute")
# Largest block of descriptor products held at once in batched matching (4 MB of float32): one
# 1000 x 1000 pair, or several smaller ones. Larger blocks measured slower (the products leave
# the cache before the argmax reads them), and at DELF's 1000 x 1000 the product itself is the
# cost, so batching mainly saves per-call overhead for images with fewer features.
_BLOCK_ELEMENTS = 1 << 20

# cv2 stops once it is this sure an all-inlier sample was drawn. skimage (as the reference
# calls it) never stops early, so ask for near-certainty: with this value cv2 still runs all
# 1000 trials below ~27 % inliers, and above that stops only when the chance of not yet having
# drawn an all-inlier sample is below 1e-9.
OPENCV_CONFIDENCE = 1.0 - 1e-9
# Levenberg-Marquardt steps on the inliers; an affine fit is linear, so a few steps reach the
# least-squares model (skimage likewise refits its final model on all inliers).
OPENCV_REFINE_ITERS = 10


@dataclass
class MatchResult:
    """Outcome of verifying one image pair."""

    num_inliers: int
    num_putative: int
    inliers_1: np.ndarray  # (K, 2) (y, x) locations in image 1 of the inlier correspondences
    inliers_2: np.ndarray  # (K, 2) matching (y, x) locations in image 2
    transform: np.ndarray | None  # 2x3 affine: image-1 (x, y, 1) -> image-2 (x, y); None if no model


def find_putative_matches(
    descriptors_1: np.ndarray, descriptors_2: np.ndarray, distance_threshold: float = 0.8, method: str = "kdtree"
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (into image 1, into image 2): each image-2 descriptor's nearest image-1
    descriptor, kept when strictly closer than `distance_threshold`.

    `method` "kdtree" is the reference's cKDTree; "brute" finds the same exact nearest neighbours
    with one matrix product (find_putative_matches_batch with one image), much faster for
    1000 x 1000 descriptors in 40-D (where a KD-tree prunes little).
    """
    if method not in NN_METHODS:
        raise InputError(f"nearest-neighbour method must be one of {', '.join(NN_METHODS)}, got {method!r}")
    if method == "brute":
        return find_putative_matches_batch([descriptors_1], descriptors_2, distance_threshold)[0]
    if len(descriptors_1) == 0 or len(descriptors_2) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    tree = cKDTree(descriptors_1)
    _, nearest = tree.query(descriptors_2, k=1, distance_upper_bound=distance_threshold)
    # cKDTree reports "nothing within the bound" as index len(descriptors_1).
    matched = nearest < len(descriptors_1)
    return nearest[matched].astype(np.int64), np.flatnonzero(matched)


def find_putative_matches_batch(
    descriptors_1: Sequence[np.ndarray], descriptors_2: np.ndarray, distance_threshold: float = 0.8
) -> list[tuple[np.ndarray, np.ndarray]]:
    """find_putative_matches(d, descriptors_2, distance_threshold, "brute") for every d in
    `descriptors_1` (e.g. the shortlisted database images against one query), from a few matrix
    products instead of one per image: image-1 descriptors are stacked and multiplied with
    descriptors_2 in blocks of at most _BLOCK_ELEMENTS products (at least one image a block).

    Per image the arithmetic is the same as for the image alone (each product element is one
    40-term dot product, each image's argmax runs over its own columns), so the matches are too.
    """
    second = np.ascontiguousarray(descriptors_2, dtype=np.float32)
    firsts = [np.asarray(d, dtype=np.float32) for d in descriptors_1]
    empty = np.zeros(0, dtype=np.int64)
    results: list[tuple[np.ndarray, np.ndarray]] = [(empty, empty)] * len(firsts)
    if len(second) == 0:
        return results
    block_rows = max(1, _BLOCK_ELEMENTS // len(second))
    second_64 = second.astype(np.float64)
    second_norms = (second_64 * second_64).sum(1)
    # A column of ones against a column of -|f|^2 / 2 puts the norm term into the product itself:
    # one pass less over every product block (measured ~25 % of batched matching's time).
    second_ones = np.hstack([second, np.ones((len(second), 1), np.float32)])
    # Float32 products err by at most ~D eps |s||f|; rows whose product distance exceeds the
    # threshold by several times that cannot match, so only the others get the exact distance.
    error_per_norm = 4 * second.shape[1] * float(np.finfo(np.float32).eps)
    images = [i for i, first in enumerate(firsts) if len(first)]
    start = 0
    while start < len(images):
        # Images whose rows fit one block (at least one image, however large).
        stop, rows = start + 1, len(firsts[images[start]])
        while stop < len(images) and rows + len(firsts[images[stop]]) <= block_rows:
            rows += len(firsts[images[stop]])
            stop += 1
        block = [firsts[i] for i in images[start:stop]]
        stacked = np.concatenate(block) if len(block) > 1 else block[0]
        half_norms = 0.5 * (stacked * stacked).sum(1)
        # argmin |s - f|^2 = argmax (s.f - |f|^2 / 2), and |s - f|^2 = |s|^2 - 2 (s.f - |f|^2 / 2).
        gain = second_ones @ np.hstack([stacked, -half_norms[:, None]]).T
        column = 0
        for image, first in zip(images[start:stop], block, strict=True):
            columns = slice(column, column + len(first))
            nearest = gain[:, columns].argmax(axis=1)
            squared = second_norms - 2.0 * gain[np.arange(len(second)), column + nearest]
            tolerance = error_per_norm * (second_norms + 2.0 * half_norms[columns].max())
            near = np.flatnonzero(squared < distance_threshold**2 + tolerance)
            column += len(first)
            difference = second_64[near] - first[nearest[near]].astype(np.float64)
            matched = near[np.sqrt((difference * difference).sum(1)) < distance_threshold]
            results[image] = (nearest[matched].astype(np.int64), matched)
        start = stop
    return results


def _spans_plane(points: np.ndarray) -> bool:
    """False when the points are (numerically) collinear or coincide: no affine map is defined."""
    centred = points - points.mean(axis=0)
    sxx, syy = (centred**2).sum(axis=0)
    sxy = (centred[:, 0] * centred[:, 1]).sum()
    return bool(sxx * syy - sxy**2 > 1e-12 * (sxx + syy) ** 2 and sxx + syy > 0)


def _sample_is_valid(sample_1: np.ndarray, sample_2: np.ndarray) -> bool:
    # cv2 rejects degenerate samples the same way; without this skimage would accept the
    # rank-deficient fit of collinear points and call every collinear point an inlier.
    return _spans_plane(sample_1) and _spans_plane(sample_2)


def _ransac_skimage(points_1, points_2, residual_threshold, max_trials, min_samples, seed):
    with warnings.catch_warnings():
        # Finding no model is an ordinary outcome for unrelated images, not a warning.
        warnings.filterwarnings("ignore", message="No inliers found")
        model, inliers = ransac(
            (points_1, points_2),
            AffineTransform,
            min_samples=min_samples,
            residual_threshold=residual_threshold,
            max_trials=max_trials,
            is_data_valid=_sample_is_valid,
            rng=seed,
        )
    if not model or inliers is None:  # None, or a falsy FailedEstimation in skimage >= 0.26
        return None, np.zeros(len(points_1), dtype=bool)
    return np.asarray(model.params[:2], dtype=np.float64).copy(), np.asarray(inliers, dtype=bool)


def _ransac_opencv(points_1, points_2, residual_threshold, max_trials, seed):
    # cv2's RANSAC draws samples from an RNG with a fixed internal seed (cv2.setRNGSeed has no
    # effect), so it is reproducible by itself; shuffling the correspondences with `seed` makes
    # the seed choose which samples are drawn, as it does for skimage.
    order = np.random.default_rng(seed).permutation(len(points_1))
    transform, mask = cv2.estimateAffine2D(
        np.ascontiguousarray(points_1[order], dtype=np.float32),
        np.ascontiguousarray(points_2[order], dtype=np.float32),
        method=cv2.RANSAC,
        ransacReprojThreshold=float(residual_threshold),
        maxIters=int(max_trials),
        confidence=OPENCV_CONFIDENCE,
        refineIters=OPENCV_REFINE_ITERS,
    )
    inliers = np.zeros(len(points_1), dtype=bool)
    if transform is None:
        return None, inliers
    inliers[order] = mask.ravel().astype(bool)
    return transform.astype(np.float64), inliers


def _check_features(features: Features, name: str) -> None:
    locations, descriptors = np.asarray(features.locations), np.asarray(features.descriptors)
    if locations.ndim != 2 or locations.shape[1] != 2:
        raise InputError(f"{name}: locations must have shape (N, 2), got {locations.shape}")
    if descriptors.ndim != 2 or len(descriptors) != len(locations):
        raise InputError(
            f"{name}: descriptors must have shape (N, D) with N = {len(locations)} locations, got {descriptors.shape}"
        )
    for what, array in (("locations", locations), ("descriptors", descriptors)):
        if not np.isfinite(array).all():
            raise InputError(f"{name}: {what} contain NaN or infinity (damaged features?)")


def _check_settings(engine, distance_threshold, residual_threshold, max_trials, min_samples) -> None:
    MatchingConfig(distance_threshold, residual_threshold, max_trials, min_samples, engine)  # validates


def match_features(
    features_1: Features,
    features_2: Features,
    *,
    distance_threshold: float = 0.8,
    residual_threshold: float = 20.0,
    max_trials: int = 1000,
    min_samples: int = 3,
    seed: int = 0,
    engine: str = "opencv",
    nn_method: str = "kdtree",
) -> MatchResult:
    """Verify two images' local features (only .locations (y, x) and .descriptors are used).

    Fewer than `min_samples` + 1 putative matches give 0 inliers without running RANSAC.
    """
    _check_settings(engine, distance_threshold, residual_threshold, max_trials, min_samples)
    _check_pair(features_1, features_2)
    index_1, index_2 = find_putative_matches(
        np.asarray(features_1.descriptors), np.asarray(features_2.descriptors), distance_threshold, nn_method
    )
    return _verify(features_1, features_2, index_1, index_2, residual_threshold, max_trials, min_samples, seed, engine)


def match_features_batch(
    features_1: Sequence[Features],
    features_2: Features,
    *,
    distance_threshold: float = 0.8,
    residual_threshold: float = 20.0,
    max_trials: int = 1000,
    min_samples: int = 3,
    seed: int = 0,
    engine: str = "opencv",
) -> list[MatchResult]:
    """match_features(f, features_2, nn_method="brute", ...) for every f in `features_1` (e.g. the
    shortlisted database images and the query), with the putative matches of all pairs from
    find_putative_matches_batch; each pair's RANSAC is then run as for the pair alone."""
    _check_settings(engine, distance_threshold, residual_threshold, max_trials, min_samples)
    for features in features_1:
        _check_pair(features, features_2)
    putative = find_putative_matches_batch(
        [np.asarray(f.descriptors) for f in features_1], np.asarray(features_2.descriptors), distance_threshold
    )
    return [
        _verify(features, features_2, index_1, index_2, residual_threshold, max_trials, min_samples, seed, engine)
        for features, (index_1, index_2) in zip(features_1, putative, strict=True)
    ]


def _check_pair(features_1: Features, features_2: Features) -> None:
    _check_features(features_1, "image 1 features")
    _check_features(features_2, "image 2 features")
    descriptors_1, descriptors_2 = np.asarray(features_1.descriptors), np.asarray(features_2.descriptors)
    if len(descriptors_1) and len(descriptors_2) and descriptors_1.shape[1] != descriptors_2.shape[1]:
        raise InputError(
            f"descriptor sizes differ: image 1 has {descriptors_1.shape[1]}-D, "
            f"image 2 has {descriptors_2.shape[1]}-D (features from different extraction settings?)"
        )


def _verify(features_1, features_2, index_1, index_2, residual_threshold, max_trials, min_samples, seed, engine):
    """Affine RANSAC on the putative matches (index_1[k], index_2[k])."""
    locations_1 = np.asarray(features_1.locations, dtype=np.float64)[index_1]
    locations_2 = np.asarray(features_2.locations, dtype=np.float64)[index_2]
    num_putative = len(index_1)
    no_model = MatchResult(0, num_putative, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), None)
    if num_putative < min_samples + 1:
        return no_model

    # Locations are (y, x); RANSAC works in (x, y) so the transform follows OpenCV's convention.
    points_1, points_2 = locations_1[:, ::-1], locations_2[:, ::-1]
    if engine == "opencv":
        transform, inliers = _ransac_opencv(points_1, points_2, residual_threshold, max_trials, seed)
    else:
        transform, inliers = _ransac_skimage(points_1, points_2, residual_threshold, max_trials, min_samples, seed)
    if transform is None:
        return no_model
    return MatchResult(
        num_inliers=int(inliers.sum()),
        num_putative=num_putative,
        inliers_1=locations_1[inliers].astype(np.float32),
        inliers_2=locations_2[inliers].astype(np.float32),
        transform=transform,
    )
