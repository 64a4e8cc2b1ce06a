"""The nearest-neighbour index over all database descriptors, and descriptor votes for images.

A KD-tree does not help in 40-D at a 0.8 radius (cKDTree needed ~160 s for 1000 query
descriptors against 500k database descriptors here), so small indexes are searched exactly by
blocked matrix products, and large ones (> EXACT_SEARCH_MAX_ROWS descriptors) by an inverted file:
k-means cells, each query descriptor compared exactly with the descriptors of its `num_probes`
nearest cells. That search is approximate; more probes find more. If faiss is importable it does
the same job (IndexFlatL2 / IndexIVFFlat).

Votes: each query descriptor's `num_neighbors` nearest database descriptors closer than
`distance_threshold` vote for their images, at most once per image, divided by sqrt(#descriptors
of the image): chance votes grow with an image's descriptor count while true matches do not;
sqrt is the cosine normalisation of bag-of-words retrieval.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_utils.cli import InputError

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
