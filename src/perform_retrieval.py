"""Landmark retrieval over stored DELF features: a voting shortlist re-ranked by RANSAC, or exhaustive RANSAC.

Both modes rank every database image for every query and return revisitop's `ranks` layout
(database size x number of queries, column i = ranking of query i) for each protocol.

- fast (default): all database descriptors go into ONE nearest-neighbour index. Each query
  descriptor's `num_neighbors` nearest database descriptors closer than `distance_threshold` vote
  for their images, at most once per image. Votes are divided by sqrt(#descriptors of the image):
  chance votes grow with an image's descriptor count while true matches do not, and dividing by the
  full count would let an image with 5 features and 3 votes beat one with 1000 features and 300
  votes; sqrt is the cosine normalisation of bag-of-words retrieval (a binary vector with n_i ones
  has norm sqrt(n_i)). The top `shortlist_size` images are verified with match_features (affine
  RANSAC) and ALL images are sorted by (inliers, votes), as the TF reference's
  RerankByGeometricVerification does.
- exhaustive: match_features against every database image, as the reference's perform_retrieval
  does (one RANSAC per database image and query, which is what makes it take hours); sorted by
  (inliers, putative matches, database order).

Junk: as in the TF reference, the protocol's junk images are skipped when the shortlist is taken,
so the verified top holds `shortlist_size` images that count. Junk differs between the easy,
medium and hard protocols, so the rankings do too; each (query, image) pair is verified at most
once and its inlier count reused across protocols.

Nearest-neighbour search: a KD-tree does not help in 40-D at a 0.8 radius (cKDTree needed ~160 s
for 1000 query descriptors against 500k database descriptors here), so small indexes are searched
exactly by blocked matrix products, and large ones (> EXACT_SEARCH_MAX_ROWS descriptors) by an
inverted file: k-means cells, each query descriptor compared exactly with the descriptors of its
`num_probes` nearest cells. That search is approximate: on random synthetic descriptors 8 probes
find about half of the exact neighbours, which still put every positive in the shortlist
(bench/retrieval.py); more probes find more. If faiss is importable it does the same job
(IndexFlatL2 / IndexIVFFlat).

CLI: python -m src.perform_retrieval --query_features Q.h5 --index_features I.h5 --gt_path GT \
         --output_dir OUT [--images_path DIR] [--mode fast|exhaustive]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src.dataset import (
    PROTOCOLS,
    GroundTruth,
    evaluate,
    format_metrics,
    image_names_in,
    load_ground_truth,
    protocol_ground_truth,
    write_metrics,
)
from src.errors import InputError, cli_main
from src.feature_io import FeatureStore, LocalFeatures, atomic_output, require_store
from src.match_images import ENGINES, match_features

LOGGER = logging.getLogger(__name__)

MODES = ("fast", "exhaustive")
NN_METHODS = ("auto", "exact", "ivf", "faiss")
# Exact search costs ~0.8 s per 1000 query descriptors at 200k rows on a busy 2-core machine;
# up to this size it stays ~0.2 s, and results equal the reference's exhaustive matching.
EXACT_SEARCH_MAX_ROWS = 50_000
DEFAULT_NUM_PROBES = 8
# Building costs rows x cells distance evaluations (8M rows x 1024 cells: ~40 s); more cells
# barely speed a query up (measured up to 5600 cells).
MAX_DEFAULT_CELLS = 1024
_KMEANS_ITERATIONS = 10
_KMEANS_SAMPLES_PER_CELL = 32
# Largest (queries x database rows) block of squared distances held at once (64 MB of float32).
_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Nearest-neighbour index over all database descriptors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescriptorIndex:
    """Every database descriptor in one searchable structure, with the image each belongs to."""

    method: str  # "exact", "ivf" or "faiss"
    descriptors: np.ndarray  # (R, D) float32; for "ivf" grouped by cell
    row_sq_norms: np.ndarray  # (R,) float32
    image_of_row: np.ndarray  # (R,) int64 database index of each row
    features_per_image: np.ndarray  # (num_images,) int64
    centroids: np.ndarray | None = None  # (C, D) ivf cell centres
    cell_starts: np.ndarray | None = None  # (C + 1,) first row of each ivf cell
    num_probes: int = DEFAULT_NUM_PROBES
    faiss_index: object | None = None


def faiss_available() -> bool:
    """True when the optional faiss package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _nearest_centroids(points: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """(len(points), count) indices of each point's `count` nearest centroids (unordered)."""
    # argmin |p - c|^2 = argmax (p.c - |c|^2 / 2): |p|^2 is the same for every centroid.
    half_norms = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    step = max(1, _BLOCK_ELEMENTS // max(1, len(centroids)))
    nearest = np.empty((len(points), count), dtype=np.int64)
    for start in range(0, len(points), step):
        gain = points[start : start + step] @ centroids.T
        gain -= half_norms
        if count == 1:
            nearest[start : start + step, 0] = gain.argmax(axis=1)
        else:
            nearest[start : start + step] = np.argpartition(gain, -count, axis=1)[:, -count:]
    return nearest


def _train_cells(descriptors: np.ndarray, num_cells: int, rng: np.random.Generator) -> np.ndarray:
    """k-means (Lloyd) centres of a sample of the descriptors; empty cells are re-seeded."""
    sample_size = min(len(descriptors), _KMEANS_SAMPLES_PER_CELL * num_cells)
    sample = descriptors[np.sort(rng.choice(len(descriptors), sample_size, replace=False))]
    centroids = sample[rng.choice(sample_size, num_cells, replace=False)].copy()
    for _ in range(_KMEANS_ITERATIONS):
        assignment = _nearest_centroids(sample, centroids, 1)[:, 0]
        order = np.argsort(assignment, kind="stable")
        counts = np.bincount(assignment, minlength=num_cells)
        filled = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
        centroids[filled] = np.add.reduceat(sample[order], starts, axis=0) / counts[filled, None]
        empty = np.flatnonzero(counts == 0)
        centroids[empty] = sample[rng.choice(sample_size, len(empty), replace=False)]
    return centroids


def build_descriptor_index(
    descriptors: np.ndarray,
    features_per_image: Sequence[int] | np.ndarray,
    *,
    method: str = "auto",
    num_cells: int | None = None,
    num_probes: int = DEFAULT_NUM_PROBES,
    seed: int = 0,
) -> DescriptorIndex:
    """Index the database descriptors: rows of image 0 first, then image 1, ... (`features_per_image`).

    method "auto" = faiss if importable, else "exact" up to EXACT_SEARCH_MAX_ROWS rows and "ivf"
    beyond. `num_cells` (ivf/faiss) defaults to sqrt(rows), at most MAX_DEFAULT_CELLS; a query
    descriptor is compared with the rows of its `num_probes` nearest cells.
    """
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    features_per_image = np.asarray(features_per_image, dtype=np.int64)
    if descriptors.ndim != 2:
        raise InputError(f"database descriptors must be a 2-D array, got shape {descriptors.shape}")
    if features_per_image.ndim != 1 or (features_per_image < 0).any():
        raise InputError("features_per_image must be a 1-D array of non-negative counts")
    if features_per_image.sum() != len(descriptors):
        raise InputError(
            f"features_per_image adds up to {features_per_image.sum()}, but there are {len(descriptors)} descriptors"
        )
    if method not in NN_METHODS:
        raise InputError(f"nearest-neighbour method must be one of {', '.join(NN_METHODS)}, got {method!r}")
    if num_probes < 1:
        raise InputError(f"num_probes must be at least 1, got {num_probes}")
    rows = len(descriptors)
    large = rows > EXACT_SEARCH_MAX_ROWS
    if method == "auto":
        method = "faiss" if faiss_available() else ("ivf" if large else "exact")
    if num_cells is None:
        num_cells = min(round(math.sqrt(rows)), MAX_DEFAULT_CELLS)
    num_cells = int(min(max(num_cells, 1), max(rows, 1)))
    image_of_row = np.repeat(np.arange(len(features_per_image)), features_per_image)

    if method == "faiss":
        import faiss  # optional dependency, only imported when chosen

        if rows and large:
            quantizer = faiss.IndexFlatL2(descriptors.shape[1])
            searcher = faiss.IndexIVFFlat(quantizer, descriptors.shape[1], num_cells)
            sample = np.random.default_rng(seed).choice(rows, min(rows, _KMEANS_SAMPLES_PER_CELL * num_cells), False)
            searcher.train(descriptors[np.sort(sample)])
            searcher.nprobe = min(num_probes, num_cells)
        else:
            searcher = faiss.IndexFlatL2(descriptors.shape[1])
        searcher.add(descriptors)
        return DescriptorIndex(
            method="faiss", descriptors=descriptors, row_sq_norms=np.empty(0, np.float32),
            image_of_row=image_of_row, features_per_image=features_per_image,
            num_probes=num_probes, faiss_index=searcher,
        )

    centroids = cell_starts = None
    if method == "ivf" and rows:
        centroids = _train_cells(descriptors, num_cells, np.random.default_rng(seed))
        cell_of_row = _nearest_centroids(descriptors, centroids, 1)[:, 0]
        order = np.argsort(cell_of_row, kind="stable")
        descriptors, image_of_row = descriptors[order], image_of_row[order]
        cell_starts = np.concatenate([[0], np.cumsum(np.bincount(cell_of_row, minlength=num_cells))])
    elif method == "ivf":
        method = "exact"  # nothing to cluster
    return DescriptorIndex(
        method=method,
        descriptors=descriptors,
        row_sq_norms=np.einsum("ij,ij->i", descriptors, descriptors),
        image_of_row=image_of_row,
        features_per_image=features_per_image,
        centroids=centroids,
        cell_starts=cell_starts,
        num_probes=min(num_probes, num_cells),
    )


def _pairs_within(queries, query_sq_norms, index, row_start, row_stop, radius_sq):
    """(query, row, squared distance) of every pair closer than the radius, rows in [start, stop)."""
    # |q - x|^2 < r^2  <=>  q.x - |x|^2 / 2 > (|q|^2 - r^2) / 2; computed in place, as the
    # products are the bulk of the memory traffic.
    gain = queries @ index.descriptors[row_start:row_stop].T
    gain -= 0.5 * index.row_sq_norms[row_start:row_stop]
    query_ids, row_ids = np.nonzero(gain > (0.5 * (query_sq_norms - radius_sq))[:, None])
    return query_ids, row_ids + row_start, query_sq_norms[query_ids] - 2.0 * gain[query_ids, row_ids]


def _keep_nearest(query_ids, row_ids, sq_distances, k):
    """Of the candidate pairs, keep each query's k nearest."""
    order = np.lexsort((row_ids, sq_distances, query_ids))
    query_ids, row_ids = query_ids[order], row_ids[order]
    group_start = np.flatnonzero(np.r_[True, query_ids[1:] != query_ids[:-1]])
    rank_in_group = np.arange(len(query_ids)) - np.repeat(group_start, np.diff(np.r_[group_start, len(query_ids)]))
    keep = rank_in_group < k
    return query_ids[keep], row_ids[keep], sq_distances[order][keep]


def find_neighbors(
    index: DescriptorIndex, queries: np.ndarray, num_neighbors: int, distance_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, database row, distance) of each query's `num_neighbors` nearest database
    descriptors strictly closer than `distance_threshold` (exact, or within the probed cells)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(queries) == 0 or len(index.descriptors) == 0:
        return empty
    radius_sq = np.float32(distance_threshold) ** 2
    if index.method == "faiss":
        k = min(num_neighbors, len(index.descriptors))
        sq_distances, rows = index.faiss_index.search(queries, k)  # squared L2; -1 = no neighbour
        query_ids, slots = np.nonzero((rows >= 0) & (sq_distances < radius_sq))
        return query_ids, rows[query_ids, slots].astype(np.int64), np.sqrt(sq_distances[query_ids, slots])

    query_sq_norms = np.einsum("ij,ij->i", queries, queries)
    pieces, pending = [], 0

    def collect(piece: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        # Near-duplicate databases can put thousands of rows within the radius of every query
        # descriptor; pruning to the k nearest as candidates pile up bounds the memory.
        nonlocal pieces, pending
        pieces.append(piece)
        pending += len(piece[0])
        if pending > _BLOCK_ELEMENTS // 4:
            pieces = [_keep_nearest(*(np.concatenate(parts) for parts in zip(*pieces, strict=True)), num_neighbors)]
            pending = len(pieces[0][0])

    if index.method == "exact":
        step = max(1, _BLOCK_ELEMENTS // len(queries))
        for start in range(0, len(index.descriptors), step):
            collect(_pairs_within(queries, query_sq_norms, index, start, start + step, radius_sq))
    else:
        num_probes = min(index.num_probes, len(index.centroids))
        probes = _nearest_centroids(queries, index.centroids, num_probes)
        # Visit each probed cell once, with all the queries that probe it.
        cells, query_of_probe = probes.ravel(), np.repeat(np.arange(len(queries)), num_probes)
        order = np.argsort(cells, kind="stable")
        cells, query_of_probe = cells[order], query_of_probe[order]
        bounds = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1], True])
        for first, stop in zip(bounds[:-1], bounds[1:], strict=True):
            cell, members = cells[first], query_of_probe[first:stop]
            row_start, row_stop = index.cell_starts[cell], index.cell_starts[cell + 1]
            if row_stop > row_start:
                local_ids, row_ids, sq = _pairs_within(
                    queries[members], query_sq_norms[members], index, row_start, row_stop, radius_sq
                )
                collect((members[local_ids], row_ids, sq))
    if not pieces:  # every probed cell was empty
        return empty
    query_ids, row_ids, sq_distances = (np.concatenate(parts) for parts in zip(*pieces, strict=True))
    query_ids, row_ids, sq_distances = _keep_nearest(query_ids, row_ids, sq_distances, num_neighbors)
    return query_ids, row_ids, np.sqrt(np.maximum(sq_distances, 0.0))


def vote_scores(
    index: DescriptorIndex, query_descriptors: np.ndarray, *, num_neighbors: int = 10, distance_threshold: float = 0.8
) -> np.ndarray:
    """(num_images,) score per database image: votes / sqrt(#descriptors of the image), where each
    query descriptor votes once for every image among its nearest neighbours."""
    query_descriptors = np.asarray(query_descriptors)
    num_images = len(index.features_per_image)
    if len(query_descriptors) and len(index.descriptors) and query_descriptors.shape[1] != index.descriptors.shape[1]:
        raise InputError(
            f"query descriptors are {query_descriptors.shape[1]}-D but the database's are "
            f"{index.descriptors.shape[1]}-D (features from different extraction settings?)"
        )
    query_ids, rows, _ = find_neighbors(index, query_descriptors, num_neighbors, distance_threshold)
    votes = np.unique(query_ids * num_images + index.image_of_row[rows]) % num_images
    counts = np.bincount(votes, minlength=num_images).astype(np.float64)
    return counts / np.sqrt(np.maximum(index.features_per_image, 1))


# ----------------------------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------------------------


def rerank_by_inliers(
    initial_scores: np.ndarray,
    junk: np.ndarray | Sequence[int],
    shortlist_size: int,
    count_inliers: Callable[[int], int],
) -> np.ndarray:
    """All database indices sorted by (inliers, initial score) descending, then database order.

    Only the `shortlist_size` best-scoring non-junk images are verified (`count_inliers(image)`);
    the others count 0 inliers, so they follow in initial-score order (TF's
    RerankByGeometricVerification).
    """
    initial_scores = np.asarray(initial_scores, dtype=np.float64)
    positions = np.arange(len(initial_scores))
    initial_order = np.lexsort((positions, -initial_scores))
    candidates = initial_order[~np.isin(initial_order, np.asarray(junk, dtype=np.int64))][:shortlist_size]
    inliers = np.zeros(len(initial_scores))
    inliers[candidates] = [count_inliers(int(image)) for image in candidates]
    return np.lexsort((positions, -initial_scores, -inliers))


def _require_stored(store: FeatureStore, names: Sequence[str], role: str) -> None:
    stored = set(store.image_ids())
    missing = [name for name in names if name not in stored]
    if missing:
        also = f" (also {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else ""
        raise InputError(f"{len(missing)} {role} image(s) have no features in {store.path}, e.g. {missing[0]!r}{also}")


def _stack_descriptors(features: list[LocalFeatures], store_path: Path) -> tuple[np.ndarray, list[LocalFeatures]]:
    """All descriptors in one array, and the features with their descriptors as views into it
    (so the per-image copies can be freed)."""
    counts = [len(f.descriptors) for f in features]
    present = [f.descriptors for f, count in zip(features, counts, strict=True) if count]
    sizes = sorted({d.shape[1] for d in present})
    if len(sizes) > 1:
        raise InputError(f"database descriptors in {store_path} have different sizes {sizes} (mixed extractions?)")
    stacked = np.concatenate(present).astype(np.float32, copy=False) if present else np.zeros((0, 1), np.float32)
    ends = np.cumsum(counts)
    views = [
        f._replace(descriptors=stacked[end - count : end]) if count else f
        for f, count, end in zip(features, counts, ends, strict=True)
    ]
    return stacked, views


class _InlierCache:
    """RANSAC results of one query against database images, computed once per image."""

    def __init__(self, query: LocalFeatures, index_features: list[LocalFeatures], match_settings: dict) -> None:
        self.query, self.index_features, self.match_settings = query, index_features, match_settings
        self.results: dict[int, tuple[int, int]] = {}  # image -> (inliers, putative matches)

    def __call__(self, image: int) -> tuple[int, int]:
        if image not in self.results:
            # Tree on the database image, queried with the query descriptors, as TF's MatchFeatures.
            result = match_features(self.index_features[image], self.query, **self.match_settings)
            self.results[image] = (result.num_inliers, result.num_putative)
        return self.results[image]

    def inliers(self, image: int) -> int:
        return self(image)[0]


def _check_settings(mode, shortlist_size, num_neighbors, distance_threshold, residual_threshold, max_trials, engine):
    problems = []
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if shortlist_size < 0:
        problems.append(f"shortlist_size must be >= 0, got {shortlist_size}")
    if num_neighbors < 1:
        problems.append(f"num_neighbors must be >= 1, got {num_neighbors}")
    if not distance_threshold > 0:
        problems.append(f"distance_threshold must be positive, got {distance_threshold}")
    if not residual_threshold > 0:
        problems.append(f"residual_threshold must be positive, got {residual_threshold}")
    if max_trials < 1:
        problems.append(f"max_trials must be >= 1, got {max_trials}")
    if engine not in ENGINES:
        problems.append(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if problems:
        raise InputError("invalid retrieval settings: " + "; ".join(problems))


def retrieve(
    query_store: FeatureStore,
    index_store: FeatureStore,
    ground_truth: GroundTruth,
    *,
    mode: str = "fast",
    shortlist_size: int = 100,
    num_neighbors: int = 10,
    distance_threshold: float = 0.8,
    residual_threshold: float = 20.0,
    max_trials: int = 1000,
    seed: int = 0,
    engine: str = "opencv",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Rank the database (ground_truth['imlist'] ids in index_store) for every query
    (ground_truth['qimlist'] ids in query_store, features of the bbx crop).

    Returns {protocol: ranks} for easy / medium / hard, ranks of shape (len(imlist), len(qimlist))
    with column i the 0-based database indices for query i, best first. RANSAC (`engine`,
    `residual_threshold`, `max_trials`, `seed`) runs once per verified (query, image) pair.
    """
    _check_settings(mode, shortlist_size, num_neighbors, distance_threshold, residual_threshold, max_trials, engine)
    imlist, qimlist = list(ground_truth["imlist"]), list(ground_truth["qimlist"])
    junk = {p: [entry["junk"] for entry in protocol_ground_truth(ground_truth["gnd"], p)] for p in PROTOCOLS}
    _require_stored(index_store, imlist, "database")
    _require_stored(query_store, qimlist, "query")
    loading = tqdm(imlist, desc="load database features", unit="image", leave=False, disable=not progress)
    index_features = [index_store.get(name) for name in loading]

    index = None
    if mode == "fast":
        started = time.perf_counter()
        stacked, index_features = _stack_descriptors(index_features, index_store.path)
        index = build_descriptor_index(stacked, [len(f.descriptors) for f in index_features], seed=seed)
        # For "ivf" the index holds its own cell-ordered copy of the descriptors; index_features
        # keep views into `stacked` for RANSAC, so a large database is held twice.
        LOGGER.info(
            "indexed %d descriptors of %d images (%s) in %.1f s",
            len(index.descriptors), len(imlist), index.method, time.perf_counter() - started,
        )

    match_settings = {
        "distance_threshold": distance_threshold, "residual_threshold": residual_threshold,
        "max_trials": max_trials, "seed": seed, "engine": engine,
        # The reference's KD-tree for parity; the same exact neighbours by matrix product when fast.
        "nn_method": "kdtree" if mode == "exhaustive" else "brute",
    }
    ranks = {p: np.empty((len(imlist), len(qimlist)), dtype=np.int64) for p in PROTOCOLS}
    positions = np.arange(len(imlist))
    for column, query_name in enumerate(tqdm(qimlist, desc=f"retrieve ({mode})", unit="query", disable=not progress)):
        started = time.perf_counter()
        query = query_store.get(query_name)
        verified = _InlierCache(query, index_features, match_settings)  # shared by the protocols
        if mode == "exhaustive":
            pairs = tqdm(positions, desc=query_name, unit="image", leave=False, disable=not progress)
            counts = np.array([verified(image) for image in pairs], dtype=np.int64).reshape(-1, 2)
            order = np.lexsort((positions, -counts[:, 1], -counts[:, 0]))
            for protocol in PROTOCOLS:
                ranks[protocol][:, column] = order
        else:
            scores = vote_scores(
                index, query.descriptors, num_neighbors=num_neighbors, distance_threshold=distance_threshold
            )
            for protocol in PROTOCOLS:
                ranks[protocol][:, column] = rerank_by_inliers(
                    scores, junk[protocol][column], shortlist_size, verified.inliers
                )
        if len(imlist):
            best = int(ranks["medium"][0, column])
            LOGGER.info(
                "query %s: %d features, %d pairs verified, medium top %s (%d inliers), %.2f s",
                query_name, len(query.descriptors), len(verified.results), imlist[best],
                verified.results.get(best, (0, 0))[0], time.perf_counter() - started,
            )
    return ranks


def save_ranks(ranks_by_protocol: Mapping[str, np.ndarray], output_dir: str | Path) -> list[Path]:
    """Write `ranks_<protocol>.npy` per protocol into output_dir (atomically); returns the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for protocol, ranks in ranks_by_protocol.items():
        ranks = np.asarray(ranks)
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
            raise InputError(f"ranks of {protocol} must be a 2-D integer array, got {ranks.dtype} {ranks.shape}")
        path = output_dir / f"ranks_{protocol}.npy"
        with atomic_output(path) as temporary, open(temporary, "wb") as file:
            np.save(file, ranks)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rank a database for every query with stored DELF features (votes + RANSAC re-ranking, "
        "or RANSAC against every image); writes ranks_<protocol>.npy, mAP.txt and metrics.json."
    )
    parser.add_argument("--query_features", required=True, help="feature store (.h5) of the queries, cropped to bbx")
    parser.add_argument("--index_features", required=True, help="feature store (.h5) of the database images")
    parser.add_argument("--gt_path", required=True,
                        help="Oxford/Paris gt txt directory, or a revisitop gnd_*.pkl / gnd_*.mat")
    parser.add_argument("--images_path", default=None,
                        help="database image directory; its sorted names are the database (txt gt only)")
    parser.add_argument("--output_dir", required=True, help="where ranks_*.npy, mAP.txt and retrieval.log go")
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="fast: vote shortlist + RANSAC re-ranking (default); exhaustive: RANSAC on every pair")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC (fast mode)")
    parser.add_argument("--num_neighbors", type=int, default=10, help="neighbours per query descriptor (fast mode)")
    parser.add_argument("--distance_threshold", type=float, default=0.8, help="descriptor matching distance")
    parser.add_argument("--residual_threshold", type=float, default=20.0, help="RANSAC inlier distance in pixels")
    parser.add_argument("--engine", choices=ENGINES, default="opencv",
                        help="RANSAC implementation (skimage = the reference's, ~20x slower)")
    parser.add_argument("--seed", type=int, default=0, help="RANSAC and clustering seed")
    return parser.parse_args(argv)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: retrieve, write the ranks of each protocol and their mAP."""
    args = _parse_args(argv)
    image_names = image_names_in(args.images_path) if args.images_path else None
    if image_names is None and Path(args.gt_path).is_dir():
        raise InputError(f"--images_path is needed with the txt ground truth in {args.gt_path} (it fixes the database)")
    ground_truth = load_ground_truth(args.gt_path, image_names)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "retrieval.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        LOGGER.info("settings: %s", vars(args))
        started = time.perf_counter()
        with FeatureStore(require_store(args.query_features)) as query_store, \
                FeatureStore(require_store(args.index_features)) as index_store:
            ranks = retrieve(
                query_store, index_store, ground_truth,
                mode=args.mode, shortlist_size=args.shortlist_size, num_neighbors=args.num_neighbors,
                distance_threshold=args.distance_threshold, residual_threshold=args.residual_threshold,
                seed=args.seed, engine=args.engine,
            )
        LOGGER.info("retrieval took %.1f s", time.perf_counter() - started)
        for path in save_ranks(ranks, output_dir):
            LOGGER.info("wrote %s", path)
        results = evaluate(ranks, ground_truth)
        write_metrics(results, output_dir / "mAP.txt", output_dir / "metrics.json")
        text = format_metrics(results)
        LOGGER.info("metrics:\n%s", text)
        print(text, end="")
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
    return 0


if __name__ == "__main__":
    main()
