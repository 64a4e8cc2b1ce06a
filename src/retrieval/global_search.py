"""Global retrieval (DELG): the database scored by the inner product of global descriptors, with the
optional expansions of the Revisited Oxford/Paris evaluations (off by default):

- αQE, alpha query expansion (`retrieval.query_expansion` = n): a query q becomes
  normalize(q + sum over its n best database images x_j of max(q.x_j, 0)^α x_j), and the database
  is scored again with it;
- αDBA, database-side augmentation (`retrieval.database_augmentation` = k): every database
  descriptor x_i becomes normalize(sum over its k nearest database images x_j, itself included, of
  max(x_i.x_j, 0)^α x_j) before any query is scored (αQE then expands over these).

α is `retrieval.expansion_alpha` (3 in those evaluations). The neighbours are taken over the whole
database, junk images included, as in those evaluations. DBA holds the database's descriptors in
memory and searches every image's neighbours (faiss.knn: N^2 D multiply-adds, seconds for Oxford's
5,063 images, hours at 100,000), so it suits data sets of the Oxford/Paris size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_utils.cli import InputError
from model_utils.config import RetrievalConfig
from src.extraction.store_reader import NoGlobalDescriptorError
from src.retrieval.faiss_setup import faiss
from src.retrieval.global_index import GlobalIndex, StoreGlobalSource, index_path_for, open_or_build_global_index

LOGGER = logging.getLogger("delf.retrieval")
QUERY_BATCH = 64  # queries scored by one matrix product (their scores: 64 x 4 bytes per database image)


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, neighbour_scores: np.ndarray,
                          alpha: float) -> np.ndarray:
    """(Q, D) expanded queries: normalize(q + sum_j max(s_j, 0)^alpha x_j) over each query's
    neighbours `neighbours` (Q, n, D) with scores `neighbour_scores` (Q, n)."""
    weights = np.maximum(neighbour_scores.astype(np.float64), 0.0) ** alpha
    expanded = queries.astype(np.float64) + np.einsum("qn,qnd->qd", weights, neighbours.astype(np.float64))
    return _normalized(expanded)


def database_augmentation(database: np.ndarray, count: int, alpha: float) -> np.ndarray:
    """(N, D) αDBA of the database: each row replaced by normalize(sum_j max(x_i.x_j, 0)^alpha x_j)
    over its `count` nearest rows by inner product (itself included), found by faiss.knn (exact)."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    count = min(count, len(database))
    if not count:
        return database.copy()
    scores, neighbours = faiss.knn(database, database, count, metric=faiss.METRIC_INNER_PRODUCT)
    weights = np.maximum(scores.astype(np.float64), 0.0) ** alpha
    augmented = np.empty_like(database)
    for start in range(0, len(database), QUERY_BATCH):  # bounds the (batch, count, D) gather
        rows = slice(start, start + QUERY_BATCH)
        augmented[rows] = _normalized(np.einsum("bn,bnd->bd", weights[rows], database[neighbours[rows]]))
    return augmented


class GlobalScorer:
    """Global scores of every query against the database (`numbers`: the database images' numbers
    in the index, in database order), computed QUERY_BATCH queries at a time on first use."""

    def __init__(self, index: GlobalIndex, numbers: np.ndarray, queries: np.ndarray,
                 settings: RetrievalConfig = RetrievalConfig()) -> None:
        self.index, self.numbers, self.settings = index, np.asarray(numbers, dtype=np.int64), settings
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._identity = np.array_equal(self.numbers, np.arange(len(index.image_ids)))
        self.database: np.ndarray | None = None  # in memory only with DBA
        if settings.database_augmentation and len(self.numbers):
            started = time.perf_counter()
            self.database = database_augmentation(index.rows(self.numbers), settings.database_augmentation,
                                                  settings.expansion_alpha)
            LOGGER.info("αDBA over %d neighbours of %d images: %.1f s", settings.database_augmentation,
                        len(self.numbers), time.perf_counter() - started)
        self._batch_start, self._batch = -1, np.zeros((0, 0), np.float32)

    def _score(self, queries: np.ndarray) -> np.ndarray:
        if self.database is not None:
            return queries @ self.database.T
        scores = self.index.scores(queries)
        return scores if self._identity else scores[:, self.numbers]

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        """Descriptors (augmented with DBA) of the database images at `positions` (any shape)."""
        flat = positions.reshape(-1)
        rows = self.database[flat] if self.database is not None else self.index.rows(self.numbers[flat])
        return rows.reshape(*positions.shape, -1)

    def score_batch(self, queries: np.ndarray) -> np.ndarray:
        """(Q, database size) scores of `queries`, expanded by αQE when it is on."""
        scores = self._score(queries)
        count = min(self.settings.query_expansion, scores.shape[1])
        if count:
            # The best `count` per query; a stable sort breaks ties by database order, as every ranking does.
            best = np.argsort(-scores, axis=1, kind="stable")[:, :count]
            expanded = alpha_query_expansion(queries, self._rows(best), np.take_along_axis(scores, best, axis=1),
                                             self.settings.expansion_alpha)
            scores = self._score(expanded)
        return scores

    def __call__(self, column: int) -> np.ndarray:
        """(database size,) scores of query `column`."""
        start = column - column % QUERY_BATCH
        if start != self._batch_start:
            self._batch, self._batch_start = self.score_batch(self.queries[start:start + QUERY_BATCH]), start
        return self._batch[column - start]


def _no_global(error: NoGlobalDescriptorError, role: str) -> InputError:
    return InputError(f"{error}; retrieval.mode global ranks by global descriptors: extract the {role} images "
                      "with a DELG model, or use --retrieval.mode=asmk")


def global_scorer(index_store, query_store, database_ids: Sequence[str], query_ids: Sequence[str],
                  settings: RetrievalConfig, index_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> GlobalScorer:
    """A GlobalScorer of the queries (`query_ids` in query_store) against the database
    (`database_ids` in index_store), its index opened or built in `index_dir` (default
    `<index store>.global`). One-line InputError when an image has no global descriptor."""
    started = time.perf_counter()
    index_dir = Path(index_dir) if index_dir else index_path_for(index_store.path)
    try:
        index = open_or_build_global_index(index_dir, StoreGlobalSource(index_store), database_ids, progress=progress)
    except NoGlobalDescriptorError as error:
        raise _no_global(error, "database") from None
    try:
        queries = np.stack([query_store.global_descriptor(name) for name in query_ids]) if len(query_ids) else \
            np.zeros((0, index.dim), np.float32)
    except NoGlobalDescriptorError as error:
        raise _no_global(error, "query") from None
    LOGGER.info("global index %s: %d images, %d-D, %.1f MB, ready in %.1f s", index_dir, len(index.image_ids),
                index.dim, index.num_bytes() / 2**20, time.perf_counter() - started)
    numbers = np.array([index.number_of[name] for name in database_ids], dtype=np.int64)
    return GlobalScorer(index, numbers, queries, settings)
