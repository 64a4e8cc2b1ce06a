"""Per-query retrieval time through a real feature store, with the store's pages in memory or not:
search, reading the shortlist's keypoints, re-ranking; one after the other or read ahead.

A synthetic database (bench/synthetic_delf.py, power-law by default) is written once into a
FeatureStore in --work_dir (kept and reused by later runs). Per database size (a prefix of it),
the asmk index is built from the store (timed), then the queries run four ways, alternating:

- sequential, warm: search, read the shortlisted images' keypoints, re-rank (one batched
  match), with the store's pages in the page cache;
- sequential, cold: the same with the store's pages dropped before each query
  (posix_fadvise DONTNEED on the store file: as when the store is larger than memory);
- read ahead, cold: as `retrieve` does it, the shortlist read by rerank.KeypointReader's thread
  in store order while the next query is searched and this one verified, pages dropped before
  each query;
- read ahead, warm.

Per-query figures are medians of whole queries (search + read + re-rank) and of their parts.
Exhaustive RANSAC is timed on the positives + --exhaustive_pairs sampled distractors per query
and extrapolated. Absolute times move with the machine's load; compare the rows of one run.

    python bench/retrieval.py [--sizes 2000 10000] [--queries 20] [--distribution powerlaw]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_delf import DIM, DISTRIBUTIONS, POSITIVES_PER_QUERY, SETTINGS_HASH  # noqa: E402
from model_utils.config import RetrievalConfig  # noqa: E402
from src.evaluation.metrics import compute_ap  # noqa: E402
from src.extraction.store import FeatureStore  # noqa: E402
from src.matching.verify import match_features_batch  # noqa: E402
from src.retrieval.index_build import StoreSource, open_or_build_index  # noqa: E402
from src.retrieval.rerank import KeypointReader, rerank_by_inliers, shortlist  # noqa: E402
from src.retrieval.scan import default_threads  # noqa: E402

SETTINGS = RetrievalConfig()


def write_store(path: Path, database, size: int) -> None:
    with FeatureStore(path) as store:
        todo = [n for n in range(size) if not store.is_done(database.image_id(n), SETTINGS_HASH)]
        for number in tqdm(todo, desc="write the synthetic feature store", unit="image", disable=not todo):
            store.put(database.image_id(number), database.image(number), image_size=(768, 1024),
                      settings_hash=SETTINGS_HASH)


def drop_pages(path: Path) -> None:
    """Evict a file's pages from the page cache (clean pages: the store is not being written)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def search(index, query, threads: int) -> np.ndarray:
    return index.scores(query.descriptors, SETTINGS.query_assignments, assignment_share=SETTINGS.assignment_share,
                        threads=threads)


def run_sequential(store, index, names, queries, threads, shortlist_size, cold: bool):
    """Per query (seconds: search, read, re-rank), and the rankings."""
    timings, rankings = [], []
    for query in queries:
        if cold:
            drop_pages(store.path)
        started = time.perf_counter()
        scores = search(index, query, threads)
        searched = time.perf_counter()
        candidates = shortlist(scores, [], shortlist_size)
        features = [store.keypoints(names[int(n)]) for n in candidates]
        read = time.perf_counter()
        results = match_features_batch(features, query)
        timings.append((searched - started, read - searched, time.perf_counter() - read))
        inliers = {int(n): r.num_inliers for n, r in zip(candidates, results, strict=True)}
        rankings.append(rerank_by_inliers(scores, [], shortlist_size, inliers.__getitem__))
    return timings, rankings


def run_read_ahead(store, index, names, queries, threads, shortlist_size, cold: bool):
    """As `retrieve`: the next query is searched while this one's shortlist is read. Per query
    (seconds: whole query including the next one's search, waiting for reads), and the rankings."""
    reader = KeypointReader(store, names, capacity=4 * shortlist_size)
    timings, rankings = [], []

    def searched(number):
        scores = search(index, queries[number], threads)
        candidates = shortlist(scores, [], shortlist_size)
        reader.prefetch(candidates)
        return scores, candidates

    if cold:
        drop_pages(store.path)
    upcoming = searched(0)
    for number, query in enumerate(queries):
        started = time.perf_counter()
        scores, candidates = upcoming
        if number + 1 < len(queries):
            if cold:
                drop_pages(store.path)
            upcoming = searched(number + 1)
        waited = time.perf_counter()
        features = [reader[int(n)] for n in candidates]
        read = time.perf_counter()
        results = match_features_batch(features, query)
        timings.append((waited - started, read - waited, time.perf_counter() - read))
        inliers = {int(n): r.num_inliers for n, r in zip(candidates, results, strict=True)}
        rankings.append(rerank_by_inliers(scores, [], shortlist_size, inliers.__getitem__))
    reader.close()
    return timings, rankings


def time_exhaustive(store, database, names, queries, size, pairs, rng):
    """(batched RANSAC seconds per pair, mAP of the sampled rankings)."""
    per_pair, aps = [], []
    for number, query in enumerate(queries):
        positives = database.positives(number, size)
        images = np.concatenate([positives, rng.choice(np.setdiff1d(np.arange(size), positives), pairs,
                                                        replace=False)])
        features = [store.keypoints(names[int(n)]) for n in images]
        started = time.perf_counter()
        results = match_features_batch(features, query)
        per_pair.append((time.perf_counter() - started) / len(images))
        inliers = np.array([r.num_inliers for r in results])
        order = images[np.lexsort((np.arange(len(images)), -inliers))]
        aps.append(compute_ap(np.flatnonzero(np.isin(order, positives)), len(positives)))
    return statistics.median(per_pair), float(np.mean(aps))


def mean_ap(database, rankings, size) -> float:
    aps = []
    for number, ranking in enumerate(rankings):
        positives = database.positives(number, size)
        aps.append(compute_ap(np.flatnonzero(np.isin(ranking, positives)), len(positives)))
    return 100 * float(np.mean(aps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000], help="database sizes")
    parser.add_argument("--features", type=int, default=800, help="features per image")
    parser.add_argument("--distribution", default="powerlaw", choices=sorted(DISTRIBUTIONS))
    parser.add_argument("--queries", type=int, default=20, help="queries per size (medians reported)")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC")
    parser.add_argument("--exhaustive_pairs", type=int, default=100, help="distractors verified per query (0: skip)")
    parser.add_argument("--work_dir", default="/tmp/delf_bench_retrieval", help="feature store (kept) and indexes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes))
    if sizes[0] < 20 * POSITIVES_PER_QUERY or args.queries < 1:
        parser.error(f"sizes must be >= {20 * POSITIVES_PER_QUERY} and --queries >= 1")

    started_run = time.perf_counter()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    database = DISTRIBUTIONS[args.distribution](args.features, positive_period=sizes[0] // POSITIVES_PER_QUERY,
                                                seed=args.seed)
    store_path = work_dir / f"{args.distribution}_{args.features}_{args.seed}_{sizes[0]}.h5"
    write_store(store_path, database, sizes[-1])
    queries = [database.query(q) for q in range(args.queries)]
    rng = np.random.default_rng(args.seed + 1)
    threads = SETTINGS.search_threads or default_threads()
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores")
    print(f"{args.distribution} synthetic database in {store_path} ({store_path.stat().st_size / 2**30:.2f} GB): "
          f"{args.features} features x {DIM}-D per image, {POSITIVES_PER_QUERY} positives per query, {args.queries} "
          f"queries, shortlist {args.shortlist_size}, {SETTINGS}")
    print(f"{'images':>7} {'way':>18} {'query s':>8} {'search s':>8} {'read s':>7} {'rerank s':>8} {'mAP':>6} "
          f"{'CPU s':>7}")
    with FeatureStore(store_path) as store:
        match_features_batch([queries[0]], queries[-1])  # warm-up
        for size in sizes:
            names = [database.image_id(n) for n in range(size)]
            started = time.perf_counter()
            index = open_or_build_index(work_dir / f"{store_path.name}.asmk_{size}", StoreSource([store]), names,
                                        stop_word_share=SETTINGS.stop_word_share, seed=args.seed, progress=True)
            print(f"{size:>7} index: {time.perf_counter() - started:.1f} s to open or build, "
                  f"{index.num_bytes() / size:.0f} bytes per image")
            ways = {"sequential, warm": (run_sequential, False), "sequential, cold": (run_sequential, True),
                    "read ahead, cold": (run_read_ahead, True), "read ahead, warm": (run_read_ahead, False)}
            for way, (run, cold) in ways.items():
                cpu = time.process_time()
                timings, rankings = run(store, index, names, queries, threads, args.shortlist_size, cold)
                cpu = (time.process_time() - cpu) / len(queries)
                parts = [statistics.median(column) for column in zip(*timings, strict=True)]
                total = statistics.median(sum(t) for t in timings)
                print(f"{size:>7} {way:>18} {total:>8.3f} {parts[0]:>8.3f} {parts[1]:>7.3f} {parts[2]:>8.3f} "
                      f"{mean_ap(database, rankings, size):>6.2f} {cpu:>7.3f}", flush=True)
            if args.exhaustive_pairs:
                pair_seconds, exhaustive_ap = time_exhaustive(store, database, names, queries, size,
                                                              args.exhaustive_pairs, rng)
                print(f"{size:>7} {'exhaustive':>18} {pair_seconds * size:>8.1f}  (extrapolated: "
                      f"{1e3 * pair_seconds:.2f} ms per pair; mAP {exhaustive_ap:.2f} with "
                      f"{args.exhaustive_pairs} sampled distractors)")
    print("read ahead: 'search s' is the next query's search, 'read s' the wait for this query's keypoints; "
          "CPU s: the process's CPU time per query (all threads), the mean")
    print(f"load average at the end: {os.getloadavg()}; run time {(time.perf_counter() - started_run) / 60:.1f} min")


if __name__ == "__main__":
    main()
