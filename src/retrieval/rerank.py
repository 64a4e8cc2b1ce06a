"""Landmark retrieval over stored DELF features: a shortlist re-ranked by RANSAC, or exhaustive RANSAC.

Every mode ranks every database image for every query and returns revisitop's `ranks` layout
(database size x number of queries, column i = ranking of query i) for each protocol.

- asmk (default): DELF-ASMK* similarity (src/retrieval/asmk.py) from an index file beside the
  database feature store (`<store>.asmk`, built on first use, completed when images are added,
  memory-mapped) gives a shortlist of `shortlist_size` images, verified with RANSAC; ALL images
  are then sorted by (inliers, similarity), as the TF reference's RerankByGeometricVerification.
- global (DELG): exact inner products of the global descriptors (src/retrieval/global_search.py,
  index `<store>.global` beside the database store, memory-mapped) give the shortlist, verified
  and sorted as in asmk mode: by (inliers, global score), ties by database order.
- exhaustive: RANSAC against every database image, as the reference's perform_retrieval does;
  sorted by (inliers, putative matches, database order).

Verification of one query against many images takes the putative matches of all of them from a
few matrix products (match_features_batch); results equal matching each pair alone.

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
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import MatchingConfig, RetrievalConfig
from model_utils.files import atomic_output
from src.extraction.features import Keypoints, LocalFeatures
from src.extraction.store import FeatureStore
from src.matching.verify import match_features_batch
from src.retrieval.global_search import global_scorer
from src.retrieval.index_build import StoreSource, index_path_for, open_or_build_index
from src.retrieval.inverted_file import image_numbers
from src.retrieval.scan import default_threads

LOGGER = logging.getLogger("delf.retrieval")
# Database images whose features are kept between queries in asmk mode (~180 KB each at 1000 x
# 40-D): shortlists of related queries overlap.
FEATURE_CACHE_IMAGES = 1024
# retrieve()'s per-query hook: (query column, {database index: (inliers, putative)}, {protocol: ranking}).
VerifiedCallback = Callable[[int, Mapping[int, tuple[int, int]], Mapping[str, np.ndarray]], None]


def shortlist(initial_scores: np.ndarray, junk: np.ndarray | Sequence[int], shortlist_size: int) -> np.ndarray:
    """The `shortlist_size` best-scoring non-junk database indices, best first (ties: database order)."""
    initial_scores = np.asarray(initial_scores, dtype=np.float64)
    junk = np.asarray(junk, dtype=np.int64)
    if shortlist_size <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.arange(len(initial_scores))
    wanted = shortlist_size + len(junk)  # the shortlist is among the `wanted` best, whatever the junk
    if wanted < len(initial_scores) // 4:
        # Only the best `wanted` (and images tied with the last of them) are sorted: a partition is
        # O(n) where sorting all is O(n log n), ~7 ms at 100,000 images.
        threshold = np.partition(initial_scores, len(initial_scores) - wanted)[len(initial_scores) - wanted]
        candidates = np.flatnonzero(initial_scores >= threshold)
    initial_order = candidates[np.lexsort((candidates, -initial_scores[candidates]))]
    return initial_order[~np.isin(initial_order, junk)][:shortlist_size]


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
    candidates = shortlist(initial_scores, junk, shortlist_size)
    inliers = np.zeros(len(initial_scores))
    inliers[candidates] = [count_inliers(int(image)) for image in candidates]
    return np.lexsort((np.arange(len(initial_scores)), -initial_scores, -inliers))


def _require_stored(store: FeatureStore, names: Sequence[str], role: str) -> None:
    stored = set(store.image_ids())
    missing = [name for name in names if name not in stored]
    if missing:
        also = f" (also {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else ""
        raise InputError(f"{len(missing)} {role} image(s) have no features in {store.path}, e.g. {missing[0]!r}{also}")


class KeypointReader:
    """Database keypoints for re-ranking, read ahead: `prefetch` queues images for one background
    thread, which reads them in store order (sorted ids: compaction writes images sorted) while the
    caller searches and verifies; the `capacity` most recently used are kept. Every read of the
    store goes through that thread, so the store is never used by two threads at once."""

    def __init__(self, store: FeatureStore, names: Sequence[str], capacity: int) -> None:
        self.store, self.names, self.capacity = store, names, capacity
        self.cached: OrderedDict[int, Keypoints] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delf-keypoints")

    def prefetch(self, images: Sequence[int] | np.ndarray) -> None:
        """Start reading these images (those neither kept nor queued yet)."""
        wanted = {int(image) for image in np.asarray(images).ravel()} - self.cached.keys() - self._pending.keys()
        for image in sorted(wanted, key=self.names.__getitem__):
            self._pending[image] = self._thread.submit(self.store.keypoints, self.names[image])

    def __getitem__(self, image: int) -> Keypoints:
        if image in self.cached:
            self.cached.move_to_end(image)
            return self.cached[image]
        self.prefetch([image])
        self.cached[image] = self._pending.pop(image).result()
        if len(self.cached) > self.capacity:
            self.cached.popitem(last=False)
        return self.cached[image]

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class _Verifier:
    """RANSAC results of one query against database images, each image verified once."""

    def __init__(self, query: LocalFeatures, features: Sequence[Keypoints] | KeypointReader,
                 match_settings: dict) -> None:
        self.query, self.features, self.match_settings = query, features, match_settings
        self.results: dict[int, tuple[int, int]] = {}  # image -> (inliers, putative matches)

    def verify(self, images: Sequence[int] | np.ndarray) -> None:
        """Verify the images not verified yet, all in one batch."""
        todo = [int(image) for image in dict.fromkeys(np.asarray(images, dtype=np.int64).tolist())
                if int(image) not in self.results]
        if todo:
            batch = match_features_batch([self.features[image] for image in todo], self.query, **self.match_settings)
            self.results.update((image, (r.num_inliers, r.num_putative)) for image, r in zip(todo, batch, strict=True))

    def inliers(self, image: int) -> int:
        return self.results[image][0]


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
    asmk_index_dir: str | os.PathLike | None = None,
    record_verified: VerifiedCallback | None = None,
    global_index_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Rank the database (`database_ids` in index_store) for every query (`query_ids` in query_store,
    features of the bbx crop).

    `junk` maps each protocol to every query's junk database indices (ground_truth.junk_by_protocol).
    Returns {protocol: ranks}, ranks of shape (len(database_ids), len(query_ids)) with column i the
    0-based database indices for query i, best first. RANSAC runs once per verified (query, image) pair.
    `asmk_index_dir`: where the asmk index lives (default: `<index store path>.asmk`);
    `global_index_dir`: the global mode's (default: `<index store path>.global`).
    `record_verified(column, {image: (inliers, putative matches)}, {protocol: ranking})` is called
    after each query with its verified pairs (the report shows their inlier counts).
    """
    mode, shortlist_size = settings.mode, settings.shortlist_size
    imlist, qimlist = list(database_ids), list(query_ids)
    protocols = list(junk)
    _require_stored(index_store, imlist, "database")
    _require_stored(query_store, qimlist, "query")

    started = time.perf_counter()
    if mode == "asmk":
        index_dir = Path(asmk_index_dir) if asmk_index_dir else index_path_for(index_store.path)
        index = open_or_build_index(index_dir, StoreSource([index_store]), imlist, codebook_size=settings.codebook_size,
                                    stop_word_share=settings.stop_word_share, seed=seed, progress=progress)
        search_threads = settings.search_threads or default_threads()
        number_of_image = image_numbers(index, imlist)
        LOGGER.info("ASMK index %s: %d images, %d words, %.1f MB, ready in %.1f s", index_dir,
                    len(index.image_ids), index.codebook.size, index.num_bytes() / 2**20, time.perf_counter() - started)

        def scores_of(column: int, query: LocalFeatures) -> np.ndarray:
            return index.scores(query.descriptors, settings.query_assignments,
                                assignment_share=settings.assignment_share, threads=search_threads)[number_of_image]
    elif mode == "global":
        global_scores = global_scorer(index_store, query_store, imlist, qimlist, settings, global_index_dir, progress)

        def scores_of(column: int, query: LocalFeatures) -> np.ndarray:
            return global_scores(column)
    else:
        loading = tqdm(imlist, desc="load database features", unit="image", leave=False, disable=not progress)
        features = [index_store.keypoints(name) for name in loading]
    if mode != "exhaustive":
        features = KeypointReader(index_store, imlist, FEATURE_CACHE_IMAGES)

        def search(column: int) -> tuple[LocalFeatures, np.ndarray, np.ndarray]:
            """A query's features, scores and shortlisted images (whose reading starts now)."""
            query = query_store.get(qimlist[column])
            scores = scores_of(column, query)
            candidates = np.concatenate(
                [shortlist(scores, junk[protocol][column], shortlist_size) for protocol in protocols] or [[]])
            features.prefetch(candidates)
            return query, scores, candidates

    match_settings = {**dataclasses.asdict(matching), "seed": seed}
    ranks = {p: np.empty((len(imlist), len(qimlist)), dtype=np.int64) for p in protocols}
    positions = np.arange(len(imlist))
    try:  # the reader's thread must stop even when a query fails (it would read a closed store)
        upcoming = search(0) if mode != "exhaustive" and qimlist else None
        progress_bar = tqdm(qimlist, desc=f"retrieve ({mode})", unit="query", disable=not progress)
        for column, query_name in enumerate(progress_bar):
            started = time.perf_counter()
            if mode == "exhaustive":
                query = query_store.get(query_name)
            else:
                query, scores, candidates = upcoming
                if column + 1 < len(qimlist):
                    upcoming = search(column + 1)  # while this query's shortlist is being read
            verifier = _Verifier(query, features, match_settings)  # shared by the protocols
            if mode == "exhaustive":
                verifier.verify(positions)
                counts = np.array([verifier.results[image] for image in positions], dtype=np.int64).reshape(-1, 2)
                order = np.lexsort((positions, -counts[:, 1], -counts[:, 0]))
                for protocol in protocols:
                    ranks[protocol][:, column] = order
            else:
                verifier.verify(candidates)
                for protocol in protocols:
                    ranks[protocol][:, column] = rerank_by_inliers(
                        scores, junk[protocol][column], shortlist_size, verifier.inliers
                    )
            if record_verified is not None:
                record_verified(column, verifier.results,
                                {protocol: ranks[protocol][:, column] for protocol in protocols})
            if len(imlist) and protocols:
                best = int(ranks[protocols[-1]][0, column])
                LOGGER.info(
                    "query %s: %d features, %d pairs verified, top %s (%d inliers), %.2f s",
                    query_name, len(query.descriptors), len(verifier.results), imlist[best],
                    verifier.results.get(best, (0, 0))[0], time.perf_counter() - started,
                )
    finally:
        if isinstance(features, KeypointReader):
            features.close()
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
