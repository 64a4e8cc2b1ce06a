"""Landmark retrieval over stored DELF features: a voting shortlist re-ranked by RANSAC, or exhaustive RANSAC.

Both modes rank every database image for every query and return revisitop's `ranks` layout
(database size x number of queries, column i = ranking of query i) for each protocol.

- fast (default): votes of the query's descriptors (src/retrieval/index.py) give a shortlist of
  `shortlist_size` images, verified with match_features (affine RANSAC); ALL images are then
  sorted by (inliers, votes), as the TF reference's RerankByGeometricVerification does.
- exhaustive: match_features against every database image, as the reference's perform_retrieval
  does (one RANSAC per database image and query, which is what makes it take hours); sorted by
  (inliers, putative matches, database order).

Junk: as in the TF reference, the protocol's junk images are skipped when the shortlist is taken,
so the verified top holds `shortlist_size` images that count. Junk differs between the easy,
medium and hard protocols, so the rankings do too; each (query, image) pair is verified at most
once and its inlier count reused across protocols.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import MatchingConfig, RetrievalConfig
from model_utils.files import atomic_output
from src.extraction.store import FeatureStore, LocalFeatures
from src.matching.verify import match_features
from src.retrieval.index import build_descriptor_index, vote_scores

LOGGER = logging.getLogger("delf.retrieval")


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


def retrieve(
    query_store: FeatureStore,
    index_store: FeatureStore,
    database_ids: Sequence[str],
    query_ids: Sequence[str],
    junk: Mapping[str, Sequence[np.ndarray]],
    *,
    settings: RetrievalConfig = RetrievalConfig(),
    matching: MatchingConfig = MatchingConfig(),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Rank the database (`database_ids` in index_store) for every query (`query_ids` in query_store,
    features of the bbx crop).

    `junk` maps each protocol to every query's junk database indices (ground_truth.junk_by_protocol).
    Returns {protocol: ranks}, ranks of shape (len(database_ids), len(query_ids)) with column i the
    0-based database indices for query i, best first. RANSAC runs once per verified (query, image) pair.
    """
    mode, shortlist_size = settings.mode, settings.shortlist_size
    imlist, qimlist = list(database_ids), list(query_ids)
    protocols = list(junk)
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
        **dataclasses.asdict(matching), "seed": seed,
        # The reference's KD-tree for parity; the same exact neighbours by matrix product when fast.
        "nn_method": "kdtree" if mode == "exhaustive" else "brute",
    }
    ranks = {p: np.empty((len(imlist), len(qimlist)), dtype=np.int64) for p in protocols}
    positions = np.arange(len(imlist))
    for column, query_name in enumerate(tqdm(qimlist, desc=f"retrieve ({mode})", unit="query", disable=not progress)):
        started = time.perf_counter()
        query = query_store.get(query_name)
        verified = _InlierCache(query, index_features, match_settings)  # shared by the protocols
        if mode == "exhaustive":
            pairs = tqdm(positions, desc=query_name, unit="image", leave=False, disable=not progress)
            counts = np.array([verified(image) for image in pairs], dtype=np.int64).reshape(-1, 2)
            order = np.lexsort((positions, -counts[:, 1], -counts[:, 0]))
            for protocol in protocols:
                ranks[protocol][:, column] = order
        else:
            scores = vote_scores(index, query.descriptors, num_neighbors=settings.num_neighbors,
                                 distance_threshold=matching.distance_threshold)
            for protocol in protocols:
                ranks[protocol][:, column] = rerank_by_inliers(
                    scores, junk[protocol][column], shortlist_size, verified.inliers
                )
        if len(imlist) and protocols:
            best = int(ranks[protocols[-1]][0, column])
            LOGGER.info(
                "query %s: %d features, %d pairs verified, top %s (%d inliers), %.2f s",
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
        if not protocol.isalpha():  # names a file: easy, medium, hard
            raise InputError(f"unknown protocol {protocol!r}; expected a name such as easy, medium or hard")
        if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
            raise InputError(f"ranks of {protocol} must be a 2-D integer array, got {ranks.dtype} {ranks.shape}")
        path = output_dir / f"ranks_{protocol}.npy"
        with atomic_output(path) as temporary, open(temporary, "wb") as file:
            np.save(file, ranks)
        written.append(path)
    return written


def load_ranks(path: str | os.PathLike) -> np.ndarray:
    """ranks.npy: (database size x number of queries) integer database indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranks file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InputError(f"cannot read {path} as a .npy array: {error}") from None
