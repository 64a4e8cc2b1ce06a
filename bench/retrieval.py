"""Time per query of retrieval `fast` (vote shortlist + RANSAC re-ranking) vs `exhaustive` (RANSAC on every pair).

Synthetic database shaped like DELF output: 1000 features x 40-D unit descriptors per image. Images
are views of "scenes" (a pool of scene points with a descriptor and a position each): a view keeps
a random 30 % of its scene's points, moved by a random affine map plus 2 px noise, with descriptor
noise (distance 0.25-0.75 to the scene descriptor), and fills the rest with clutter (random
descriptors at random places). Every 100th image (offset q) is a view of query scene q, the rest
views of 1000 distractor scenes, so every prefix of the database holds positives for each query.
Queries are further views of the query scenes.

`fast` is timed at every size (index built once per size, not counted per query). `exhaustive` is
timed on a sample of pairs and EXTRAPOLATED: per-pair cost x number of database images. Real DELF
descriptors cluster (bursty features, uneven cells) while these are spread evenly, and real
positives share fewer features than these views do; treat the figures as indicative.

    python bench/retrieval.py [--sizes 500 2000 5000 8000] [--queries 2] [--exhaustive_pairs 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.extraction.store import LocalFeatures  # noqa: E402
from src.matching.verify import match_features  # noqa: E402
from src.retrieval.index import EXACT_SEARCH_MAX_ROWS, build_descriptor_index, faiss_available, vote_scores
from src.retrieval.rerank import rerank_by_inliers

NUM_FEATURES = 1000
DIM = 40
SCENE_POINTS = 1000
VISIBLE_SHARE = 0.3
NUM_QUERY_SCENES = 5
NUM_DISTRACTOR_SCENES = 1000
QUERY_PERIOD = 100  # image i is a view of query scene i % 100 when that is < NUM_QUERY_SCENES
IMAGE_HW = np.array([768.0, 1024.0])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class Scenes:
    """Scene points (descriptor + (y, x) position) and a generator of views of them."""

    def __init__(self, num_scenes: int, rng: np.random.Generator) -> None:
        self.descriptors = _unit_rows(rng.standard_normal((num_scenes, SCENE_POINTS, DIM), dtype=np.float32))
        self.locations = (rng.random((num_scenes, SCENE_POINTS, 2), dtype=np.float32) * IMAGE_HW).astype(np.float32)

    def views(self, scene_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(len(scene_ids), NUM_FEATURES, DIM) descriptors and (..., 2) (y, x) locations."""
        count, visible = len(scene_ids), int(VISIBLE_SHARE * NUM_FEATURES)
        chosen = np.argpartition(rng.random((count, SCENE_POINTS)), visible, axis=1)[:, :visible]
        descriptors = rng.standard_normal((count, NUM_FEATURES, DIM), dtype=np.float32)
        noise = rng.uniform(0.04, 0.12, (count, visible, 1)).astype(np.float32)
        descriptors[:, :visible] *= noise
        descriptors[:, :visible] += self.descriptors[scene_ids[:, None], chosen]
        _unit_rows(descriptors)
        # Random affine views: scale 0.7-1.3, rotation +-25 degrees, shift up to 150 px.
        angle = rng.uniform(-0.44, 0.44, count)
        scale = rng.uniform(0.7, 1.3, count)
        linear = scale[:, None, None] * np.stack(
            [np.stack([np.cos(angle), -np.sin(angle)], 1), np.stack([np.sin(angle), np.cos(angle)], 1)], 1
        )
        shift = rng.uniform(-150, 150, (count, 1, 2))
        locations = (rng.random((count, NUM_FEATURES, 2)) * IMAGE_HW).astype(np.float32)
        moved = np.einsum("nij,nkj->nki", linear, self.locations[scene_ids[:, None], chosen]) + shift
        locations[:, :visible] = moved + rng.normal(0, 2.0, moved.shape)
        return descriptors, locations


def make_database(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray, Scenes]:
    """(num_images * NUM_FEATURES, DIM) descriptors, (num_images, NUM_FEATURES, 2) locations, scenes."""
    rng = np.random.default_rng(seed)
    scenes = Scenes(NUM_QUERY_SCENES + NUM_DISTRACTOR_SCENES, rng)
    image_ids = np.arange(num_images)
    scene_ids = np.where(
        image_ids % QUERY_PERIOD < NUM_QUERY_SCENES,
        image_ids % QUERY_PERIOD,
        NUM_QUERY_SCENES + rng.integers(0, NUM_DISTRACTOR_SCENES, num_images),
    )
    descriptors = np.empty((num_images, NUM_FEATURES, DIM), dtype=np.float32)
    locations = np.empty((num_images, NUM_FEATURES, 2), dtype=np.float32)
    step = 250
    for start in tqdm(range(0, num_images, step), desc="synthesise database", unit="chunk", leave=False):
        views = scenes.views(scene_ids[start : start + step], rng)
        descriptors[start : start + step], locations[start : start + step] = views
    return descriptors.reshape(-1, DIM), locations, scenes


def _features(descriptors: np.ndarray, locations: np.ndarray) -> LocalFeatures:
    ones = np.ones(len(descriptors), np.float32)
    return LocalFeatures(locations, ones, descriptors, ones)


def _time_fast(index, query: LocalFeatures, database: tuple[np.ndarray, np.ndarray], shortlist_size: int):
    """(seconds voting, seconds re-ranking, ranking) of one fast query."""
    descriptors, locations = database
    started = time.perf_counter()
    scores = vote_scores(index, query.descriptors)
    voted = time.perf_counter()

    def inliers(image: int) -> int:
        rows = slice(image * NUM_FEATURES, (image + 1) * NUM_FEATURES)
        return match_features(_features(descriptors[rows], locations[image]), query).num_inliers

    ranking = rerank_by_inliers(scores, [], shortlist_size, inliers)
    return voted - started, time.perf_counter() - voted, ranking


def _exhaustive_seconds_per_pair(queries, database, num_pairs: int, rng: np.random.Generator) -> float:
    descriptors, locations = database
    images = rng.choice(len(locations), num_pairs, replace=False)
    started = time.perf_counter()
    for count, image in enumerate(images):
        rows = slice(image * NUM_FEATURES, (image + 1) * NUM_FEATURES)
        match_features(_features(descriptors[rows], locations[image]), queries[count % len(queries)])
    return (time.perf_counter() - started) / num_pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Seconds per query of fast vs exhaustive retrieval (synthetic).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000, 8000], help="database sizes")
    parser.add_argument("--queries", type=int, default=2, help="queries timed per size (median reported)")
    parser.add_argument("--exhaustive_pairs", type=int, default=60, help="pairs timed to extrapolate exhaustive")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    if min(args.sizes) < QUERY_PERIOD or args.queries < 1 or args.exhaustive_pairs < 1:
        parser.error(f"sizes must be >= {QUERY_PERIOD}; --queries and --exhaustive_pairs >= 1")

    sizes = sorted(set(args.sizes))
    started = time.perf_counter()
    descriptors, locations, scenes = make_database(sizes[-1], args.seed)
    rng = np.random.default_rng(args.seed + 1)
    query_scenes = np.arange(args.queries) % NUM_QUERY_SCENES
    queries = [_features(d, loc) for d, loc in zip(*scenes.views(query_scenes, rng), strict=True)]
    print(
        f"synthetic database: {sizes[-1]} images x {NUM_FEATURES} x {DIM}-D "
        f"({descriptors.nbytes / 2**30:.2f} GiB), made in {time.perf_counter() - started:.0f} s; "
        f"{args.queries} queries, shortlist {args.shortlist_size}"
    )
    match_features(queries[0], queries[-1])  # warm-up
    per_pair = _exhaustive_seconds_per_pair(queries, (descriptors, locations), args.exhaustive_pairs, rng)
    print(f"exhaustive: {1000 * per_pair:.1f} ms per pair (match_features, opencv; {args.exhaustive_pairs} pairs)")

    header = (
        f"{'images':>7} {'method':>6} {'build s':>8} {'vote s':>7} {'rerank s':>8} {'fast s/q':>8} "
        f"{'exhaustive s/q (extrapolated)':>30} {'ratio':>6} {'positives found':>16}"
    )
    print(header)
    fast_by_size = {}
    for size in sizes:
        database = (descriptors[: size * NUM_FEATURES], locations[:size])
        started = time.perf_counter()
        index = build_descriptor_index(database[0], np.full(size, NUM_FEATURES), seed=args.seed)
        build_seconds = time.perf_counter() - started
        timings, found, wanted = [], 0, 0
        work = list(zip(query_scenes, queries, strict=True))
        for query_scene, query in tqdm(work, desc=f"{size} images", unit="query", leave=False):
            vote_seconds, rerank_seconds, ranking = _time_fast(index, query, database, args.shortlist_size)
            timings.append((vote_seconds, rerank_seconds))
            positives = np.flatnonzero(np.arange(size) % QUERY_PERIOD == query_scene)
            found += np.isin(ranking[: len(positives)], positives).sum()
            wanted += len(positives)
        del index
        vote_seconds, rerank_seconds = (statistics.median(column) for column in zip(*timings, strict=True))
        fast = vote_seconds + rerank_seconds
        fast_by_size[size] = fast
        exhaustive = per_pair * size
        print(
            f"{size:>7} {_method(size):>6} {build_seconds:>8.1f} {vote_seconds:>7.2f} {rerank_seconds:>8.2f} "
            f"{fast:>8.2f} {exhaustive:>30.1f} {exhaustive / fast:>5.0f}x {found:>9}/{wanted:<6}"
        )
    print("fast: index built once per database size (not per query); per-query figures are medians.")
    print("exhaustive: EXTRAPOLATED as per-pair cost x database size (no junk handling needed).")
    print("positives found: query-scene images ranked above every other image (after re-ranking).")
    if 5000 in fast_by_size:
        verdict = "yes" if fast_by_size[5000] < 1.0 else "no"
        print(f"fast under 1 s per query at 5,000 images: {verdict} ({fast_by_size[5000]:.2f} s)")


def _method(size: int) -> str:
    if faiss_available():
        return "faiss"
    return "ivf" if size * NUM_FEATURES > EXACT_SEARCH_MAX_ROWS else "exact"


if __name__ == "__main__":
    main()
