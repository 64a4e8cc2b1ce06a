"""The former `fast` retrieval mode's shortlist, kept as the benchmarks' baseline: every database
descriptor in one faiss index, and descriptor votes for images.

Removed from the library (src/retrieval) because the asmk mode beat it at every measured size
on search time (3-13x) and memory (an index file of ~11 KB per image instead of 160 KB per image
in RAM), with the same positives found (bench/retrieval.py, bench/retrieval_scale.py; docs/performance.md).
Unchanged otherwise:

Up to EXACT_SEARCH_MAX_ROWS descriptors the search is exact (faiss.IndexFlatL2); beyond, an
inverted file (faiss.IndexIVFFlat: k-means cells, each query descriptor compared exactly with the
descriptors of its `num_probes` nearest cells), which is approximate: more probes find more.
The index holds every descriptor as float32 (160 KB per image of 1000 40-D descriptors).

Votes: each query descriptor's `num_neighbors` nearest database descriptors closer than
`distance_threshold` vote for their images, at most once per image, divided by sqrt(#descriptors
of the image): chance votes grow with an image's descriptor count while true matches do not;
sqrt is the cosine normalisation of bag-of-words retrieval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_utils.cli import InputError
from src.retrieval.faiss_setup import faiss

# Exact search costs ~0.8 s per 1000 query descriptors at 200k rows on a busy 2-core machine;
# up to this size it stays ~0.2 s, and results equal the reference's exhaustive matching.
EXACT_SEARCH_MAX_ROWS = 50_000
DEFAULT_NUM_PROBES = 8
# Building costs rows x cells distance evaluations (8M rows x 1024 cells: ~40 s); more cells
# barely speed a query up (measured up to 5600 cells).
MAX_DEFAULT_CELLS = 1024
_TRAIN_SAMPLES_PER_CELL = 32


@dataclass(frozen=True)
class DescriptorIndex:
    """Every database descriptor in one faiss index, with the image each belongs to."""

    searcher: faiss.Index  # IndexFlatL2 (exact) or IndexIVFFlat
    dim: int
    image_of_row: np.ndarray  # (R,) int64 database index of each row
    features_per_image: np.ndarray  # (num_images,) int64

    @property
    def exact(self) -> bool:
        return not isinstance(self.searcher, faiss.IndexIVF)

    @property
    def num_rows(self) -> int:
        return len(self.image_of_row)


def build_descriptor_index(
    descriptors: np.ndarray,
    features_per_image: Sequence[int] | np.ndarray,
    *,
    exact: bool | None = None,
    num_cells: int | None = None,
    num_probes: int = DEFAULT_NUM_PROBES,
    seed: int = 0,
) -> DescriptorIndex:
    """Index the database descriptors: rows of image 0 first, then image 1, ... (`features_per_image`).

    `exact` None = exact up to EXACT_SEARCH_MAX_ROWS rows. The inverted file has `num_cells`
    cells (default sqrt(rows), at most MAX_DEFAULT_CELLS), trained on a seeded sample; a query
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
    if num_probes < 1:
        raise InputError(f"num_probes must be at least 1, got {num_probes}")
    rows, dim = descriptors.shape
    if exact is None:
        exact = rows <= EXACT_SEARCH_MAX_ROWS
    if exact or rows == 0:
        searcher = faiss.IndexFlatL2(dim)
    else:
        if num_cells is None:
            num_cells = min(round(math.sqrt(rows)), MAX_DEFAULT_CELLS)
        num_cells = int(min(max(num_cells, 1), rows))
        searcher = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, num_cells)
        sample_size = min(rows, _TRAIN_SAMPLES_PER_CELL * num_cells)
        sample = np.sort(np.random.default_rng(seed).choice(rows, sample_size, replace=False))
        searcher.cp.seed = seed
        searcher.cp.min_points_per_centroid = 1  # the sample is sized already: no warning
        searcher.train(descriptors[sample])
        searcher.nprobe = min(num_probes, num_cells)
    searcher.add(descriptors)
    return DescriptorIndex(
        searcher=searcher,
        dim=dim,
        image_of_row=np.repeat(np.arange(len(features_per_image)), features_per_image),
        features_per_image=features_per_image,
    )


def find_neighbors(
    index: DescriptorIndex, queries: np.ndarray, num_neighbors: int, distance_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, database row, distance) of each query's `num_neighbors` nearest database
    descriptors strictly closer than `distance_threshold` (exact, or within the probed cells)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) == 0 or index.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = min(num_neighbors, index.num_rows)
    sq_distances, rows = index.searcher.search(queries, k)  # squared L2; -1 = no neighbour found
    query_ids, slots = np.nonzero((rows >= 0) & (sq_distances < np.float32(distance_threshold) ** 2))
    distances = np.sqrt(np.maximum(sq_distances[query_ids, slots], 0.0))
    return query_ids, rows[query_ids, slots].astype(np.int64), distances


def vote_scores(
    index: DescriptorIndex, query_descriptors: np.ndarray, *, num_neighbors: int = 10, distance_threshold: float = 0.8
) -> np.ndarray:
    """(num_images,) score per database image: votes / sqrt(#descriptors of the image), where each
    query descriptor votes once for every image among its nearest neighbours."""
    query_descriptors = np.asarray(query_descriptors)
    num_images = len(index.features_per_image)
    if len(query_descriptors) and index.num_rows and query_descriptors.shape[1] != index.dim:
        raise InputError(
            f"query descriptors are {query_descriptors.shape[1]}-D but the database's are "
            f"{index.dim}-D (features from different extraction settings?)"
        )
    query_ids, rows, _ = find_neighbors(index, query_descriptors, num_neighbors, distance_threshold)
    votes = np.unique(query_ids * num_images + index.image_of_row[rows]) % num_images
    counts = np.bincount(votes, minlength=num_images).astype(np.float64)
    return counts / np.sqrt(np.maximum(index.features_per_image, 1))
