"""Throughput of the match step (KD-tree putative matches + affine RANSAC), skimage vs opencv engine.

Feature sets have the size DELF produces (1000 features x 40-D per image) and the shape of real
verification work: 50-200 putative matches of which 6-30 % fit one affine map. Both engines run
on the same pairs in the same process, interleaved (the order alternates every repetition), and
the medians over repetitions are compared, so load from other processes hits both alike.

    python bench/match.py [--pairs 6] [--repetitions 3]
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

from src.extraction.features import LocalFeatures  # noqa: E402
from src.matching.verify import ENGINES, find_putative_matches, match_features  # noqa: E402

NUM_FEATURES = 1000
DESCRIPTOR_DIM = 40
IMAGE_HEIGHT, IMAGE_WIDTH = 768, 1024
TRANSFORM = np.array([[0.85, -0.20, 120.0], [0.18, 0.90, -40.0]])  # image-1 (x, y, 1) -> image-2 (x, y)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_locations(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.uniform((0, 0), (IMAGE_HEIGHT, IMAGE_WIDTH), (count, 2)).astype(np.float32)


def make_pair(
    rng: np.random.Generator, num_putative: int, inlier_ratio: float
) -> tuple[LocalFeatures, LocalFeatures, int]:
    """Two feature sets with about `num_putative` putative matches, `inlier_ratio` of them true
    (affine map + 2 px noise), the rest at random places; also returns the true count."""
    num_true = max(3, round(inlier_ratio * num_putative))
    descriptors_1 = _unit_rows(rng.normal(size=(NUM_FEATURES, DESCRIPTOR_DIM)))
    locations_1 = _random_locations(rng, NUM_FEATURES)
    chosen = rng.choice(NUM_FEATURES, num_putative, replace=False)
    # Noise keeps copies within ~0.75 of their original, so every copy is a putative match.
    noise = rng.uniform(0.03, 0.11, (num_putative, 1)) * rng.normal(size=(num_putative, DESCRIPTOR_DIM))
    true_xy = locations_1[chosen[:num_true], ::-1] @ TRANSFORM[:, :2].T + TRANSFORM[:, 2]
    true_xy += rng.normal(0, 2.0, true_xy.shape)
    locations_2 = np.concatenate([true_xy[:, ::-1].astype(np.float32), _random_locations(rng, NUM_FEATURES - num_true)])
    descriptors_2 = np.concatenate(
        [
            _unit_rows(descriptors_1[chosen] + noise),
            _unit_rows(rng.normal(size=(NUM_FEATURES - num_putative, DESCRIPTOR_DIM))),
        ]
    )
    ones = np.ones(NUM_FEATURES, np.float32)
    return (
        LocalFeatures(locations_1, ones, descriptors_1, ones),
        LocalFeatures(locations_2, ones, descriptors_2, ones),
        num_true,
    )


def _time_engine(pairs, engine: str) -> tuple[float, list[int]]:
    start = time.perf_counter()
    counts = [match_features(f1, f2, engine=engine).num_inliers for f1, f2, _ in pairs]
    return time.perf_counter() - start, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pairs per second of match_features, skimage vs opencv.")
    parser.add_argument("--pairs", type=int, default=6, help="image pairs per repetition (default 6)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic feature sets")
    args = parser.parse_args(argv)

    if args.pairs < 1 or args.repetitions < 1:
        parser.error("--pairs and --repetitions must be at least 1")
    rng = np.random.default_rng(args.seed)
    # Spread the pairs evenly over 50-200 putative matches and 6-30 % inliers.
    sizes = rng.permutation(np.linspace(50, 200, args.pairs).round().astype(int))
    ratios = np.linspace(0.06, 0.30, args.pairs)
    pairs = [make_pair(rng, size, ratio) for size, ratio in zip(sizes, ratios, strict=True)]
    putative = [len(find_putative_matches(f1.descriptors, f2.descriptors)[0]) for f1, f2, _ in pairs]
    ratios = [true / count for (_, _, true), count in zip(pairs, putative, strict=True)]
    print(
        f"{args.pairs} pairs of {NUM_FEATURES} x {DESCRIPTOR_DIM}-D features: "
        f"{min(putative)}-{max(putative)} putative matches, {min(ratios):.0%}-{max(ratios):.0%} true"
    )

    for engine in ENGINES:  # warm-up: imports, caches, first-call costs
        match_features(*pairs[0][:2], engine=engine)
    seconds = {engine: [] for engine in ENGINES}
    kdtree_seconds = []
    counts = {}
    for repetition in tqdm(range(args.repetitions), desc="repetitions", unit="rep"):
        order = ENGINES if repetition % 2 == 0 else ENGINES[::-1]
        for engine in order:
            elapsed, counts[engine] = _time_engine(pairs, engine)
            seconds[engine].append(elapsed)
        start = time.perf_counter()
        for f1, f2, _ in pairs:
            find_putative_matches(f1.descriptors, f2.descriptors)
        kdtree_seconds.append(time.perf_counter() - start)

    rate = {engine: args.pairs / statistics.median(seconds[engine]) for engine in ENGINES}
    kdtree_ms = 1000 * statistics.median(kdtree_seconds) / args.pairs
    for engine in ENGINES:
        pair_ms = 1000 / rate[engine]
        print(
            f"{engine:>8}: {rate[engine]:8.2f} pairs/s  ({pair_ms:7.1f} ms/pair, median; "
            f"RANSAC ~{max(pair_ms - kdtree_ms, 0):.1f} ms of it)"
        )
    print(f"  KD-tree putative matching alone: {kdtree_ms:.1f} ms/pair (part of both)")
    print(f"opencv / skimage throughput ratio: {rate['opencv'] / rate['skimage']:.1f}x")
    differences = np.abs(np.subtract(counts["opencv"], counts["skimage"]))
    print(
        f"inlier counts opencv {counts['opencv']} vs skimage {counts['skimage']} "
        f"(|difference| median {np.median(differences):.0f}, max {differences.max()})"
    )


if __name__ == "__main__":
    main()
