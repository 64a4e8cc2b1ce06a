"""Global retrieval (retrieval.mode global, DELG) against asmk on streamed synthetic databases, in ONE run.

Each database image has a DELG-like 2048-D global descriptor and DELF-like local features
(bench/synthetic_delf.py: SyntheticGlobal, SyntheticDatabase; views of a query scene are its
positives). Per size (the index grown by adding images, as a growing collection would be):

- global: the global-descriptor index (src/retrieval/global_index.py) built or completed from the
  generated descriptors (cumulative time: generation included); its bytes per image; the search
  before re-ranking, per query: exact scores of every image for --queries queries in one matrix
  product (as retrieve() scores them), divided by the queries, plus taking the shortlist
  (rerank.shortlist: the best --shortlist_size by score). Beside it: ordering the whole database
  by score ("rank all", what the full ranking of an evaluation adds per protocol), one query
  scored alone, and faiss.knn's top --shortlist_size; then re-ranking the shortlist with one
  batched match;
- asmk: the ASMK index of the same images' local features (--asmk_features per image), built or
  completed the same way; its bytes per image, its search (one query: its scores) and re-ranking.

Measurements of the two modes alternate round by round (--rounds, medians), so load from other
processes hits both alike. "found" counts positives ranked above every distractor after
re-ranking (each query has 20, those within the database). Last, the R1M extrapolation (1M
images): bytes, global scores and shortlist proportionally (from the largest size), ordering as n log n,
asmk's search by a line fitted over the sizes (its query quantisation is a fixed part).

    python bench/global_retrieval.py [--sizes 10000 100000] [--queries 70] [--asmk_features 300]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_delf import (  # noqa: E402
    GLOBAL_DIM,
    POSITIVES_PER_QUERY,
    SyntheticDatabase,
    SyntheticGlobal,
    SyntheticSource,
)
from src.matching.verify import match_features_batch  # noqa: E402
from src.retrieval.global_index import open_or_build_global_index  # noqa: E402
from src.retrieval.index_build import build_index  # noqa: E402
from src.retrieval.rerank import rerank_by_inliers, shortlist  # noqa: E402

ONE_MILLION = 1_000_000
TARGETS = {"search_ms": 20.0, "bytes_per_image": 8.5 * 1024}


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """The database by score, ties by database order: what every ranking of retrieve() sorts."""
    return np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def rerank(database: SyntheticDatabase, query_number: int, scores: np.ndarray, shortlist_size: int):
    """(seconds, ranking): the top `shortlist_size` verified in one batch (features regenerated, not timed)."""
    candidates = shortlist(scores, [], shortlist_size)
    features = [database.image(int(number)) for number in candidates]
    seconds, results = timed(match_features_batch, features, database.query(query_number))
    inliers = {int(image): result.num_inliers for image, result in zip(candidates, results, strict=True)}
    return seconds, rerank_by_inliers(scores, [], shortlist_size, inliers.__getitem__)


def found(ranking: np.ndarray, positives: np.ndarray) -> int:
    return int(np.isin(ranking[: len(positives)], positives).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="database sizes")
    parser.add_argument("--queries", type=int, default=70, help="queries scored together (ROxf has 70)")
    parser.add_argument("--rerank_queries", type=int, default=5, help="queries re-ranked and timed one by one")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC")
    parser.add_argument("--asmk_features", type=int, default=300, help="local features per image (DELF: up to 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (medians)")
    parser.add_argument("--work_dir", default="", help="where the indexes go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes))
    if sizes[0] < 20 * POSITIVES_PER_QUERY or args.queries < args.rerank_queries or args.rerank_queries < 1:
        parser.error(f"sizes must be >= {20 * POSITIVES_PER_QUERY}; 1 <= --rerank_queries <= --queries")

    database = SyntheticDatabase(args.asmk_features, positive_period=sizes[0] // POSITIVES_PER_QUERY, seed=args.seed)
    descriptors = SyntheticGlobal(database)
    queries = np.stack([descriptors.query(q) for q in range(args.queries)])
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="global_retrieval_"))
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores")
    print(f"synthetic database: {GLOBAL_DIM}-D global descriptors, {args.asmk_features} local features x 40-D per "
          f"image; {args.queries} queries scored together, {args.rerank_queries} re-ranked; shortlist "
          f"{args.shortlist_size}; sizes {sizes}")
    match_features_batch([database.query(0)], database.query(1))  # warm-up
    rows, asmk_index, build = [], None, {"global": 0.0, "asmk": 0.0}
    try:
        previous = 0
        for size in sizes:
            ids = [database.image_id(n) for n in range(size)]
            seconds, index = timed(lambda ids=ids: open_or_build_global_index(work_dir / "synthetic.global",
                                                                              descriptors, ids, progress=True))
            build["global"] += seconds
            started = time.perf_counter()
            if asmk_index is None:
                asmk_index = build_index(work_dir / "synthetic.asmk", SyntheticSource(database), ids, seed=args.seed,
                                         progress=True)
            else:
                asmk_index.add(SyntheticSource(database), ids[previous:], progress=True)
                asmk_index.merge()
            build["asmk"] += time.perf_counter() - started
            rows.append(measure(size, index, asmk_index, database, queries, args, build))
            print_row(rows[-1], header=size == sizes[0])
            previous = size
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")
    print_summary(rows)


def measure(size, index, asmk_index, database, queries, args, build) -> dict:
    times: dict[str, list[float]] = {name: [] for name in ("scores", "top", "order", "single", "knn", "asmk")}
    index.scores(queries)  # a first pass maps the index into the page cache
    for round_number in range(args.rounds):
        for mode in (("global", "asmk") if round_number % 2 == 0 else ("asmk", "global")):
            if mode == "global":
                seconds, scores = timed(index.scores, queries)
                times["scores"].append(seconds / len(queries))
                times["top"].append(statistics.median(
                    timed(shortlist, row, [], args.shortlist_size)[0] for row in scores[:10]))
                times["order"].append(statistics.median(timed(order_by_score, row)[0] for row in scores[:10]))
                times["single"].append(statistics.median(timed(index.scores, queries[q:q + 1])[0] for q in range(3)))
                times["knn"].append(timed(index.search, queries, args.shortlist_size)[0] / len(queries))
            else:
                times["asmk"].append(statistics.median(
                    timed(asmk_index.scores, database.query(q).descriptors)[0] for q in range(3)))
    row = {name: statistics.median(values) for name, values in times.items()}
    scores = index.scores(queries[: args.rerank_queries])
    reranks = {"global": [], "asmk": []}
    counts = {"global": 0, "asmk": 0, "wanted": 0}
    for q in range(args.rerank_queries):
        positives = database.positives(q, size)
        counts["wanted"] += len(positives)
        for mode, query_scores in (("global", scores[q]), ("asmk", asmk_index.scores(database.query(q).descriptors))):
            seconds, ranking = rerank(database, q, query_scores, args.shortlist_size)
            reranks[mode].append(seconds)
            counts[mode] += found(ranking, positives)
    row.update(size=size, global_bytes=index.num_bytes() / size, asmk_bytes=asmk_index.num_bytes() / size,
               global_build=build["global"], asmk_build=build["asmk"], counts=counts,
               global_rerank=statistics.median(reranks["global"]), asmk_rerank=statistics.median(reranks["asmk"]))
    return row


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'images':>8} {'mode':>6} {'build s':>8} {'bytes/image':>11} {'search ms':>9} {'(scores':>8} "
              f"{'+ top)':>8} {'rank all':>8} {'1 query':>8} {'knn top':>8} {'rerank s':>8} {'found':>8}")
    counts = row["counts"]
    print(f"{row['size']:>8} {'global':>6} {row['global_build']:>8.1f} {row['global_bytes']:>11.0f} "
          f"{1e3 * (row['scores'] + row['top']):>9.2f} {1e3 * row['scores']:>8.2f} {1e3 * row['top']:>8.2f} "
          f"{1e3 * row['order']:>8.2f} {1e3 * row['single']:>8.1f} {1e3 * row['knn']:>8.2f} "
          f"{row['global_rerank']:>8.3f} "
          f"{counts['global']:>4}/{counts['wanted']:<3}")
    print(f"{row['size']:>8} {'asmk':>6} {row['asmk_build']:>8.1f} {row['asmk_bytes']:>11.0f} "
          f"{1e3 * row['asmk']:>9.2f} {'':>8} {'':>8} {'':>8} {1e3 * row['asmk']:>8.1f} {'':>8} "
          f"{row['asmk_rerank']:>8.3f} "
          f"{counts['asmk']:>4}/{counts['wanted']:<3}")


def line_at(sizes: list[int], values: list[float], size: int) -> float:
    """A line a + b n through the measurements (a, b >= 0), else proportional to the largest."""
    if len(sizes) > 1:
        slope, intercept = np.polyfit(sizes, values, 1)
        if slope >= 0 and intercept >= 0:
            return float(intercept + slope * size)
    return values[-1] * size / sizes[-1]


def print_summary(rows: list[dict]) -> None:
    last, sizes = rows[-1], [row["size"] for row in rows]
    search = last["scores"] + last["top"]
    print(f"\nat {last['size']:,} images, per query: global search {1e3 * search:.2f} ms = scores "
          f"{1e3 * last['scores']:.2f} + shortlist {1e3 * last['top']:.2f} (target <= {TARGETS['search_ms']:.0f} ms: "
          f"{'met' if 1e3 * search <= TARGETS['search_ms'] else 'MISSED'}); asmk search {1e3 * last['asmk']:.2f} ms "
          f"(global / asmk = {search / last['asmk']:.2f}x); one query alone {1e3 * last['single']:.1f} ms; "
          f"ordering all images {1e3 * last['order']:.2f} ms")
    met = last["global_bytes"] <= TARGETS["bytes_per_image"]
    print(f"global index {last['global_bytes']:.0f} bytes per image (target <= {TARGETS['bytes_per_image']:.0f}: "
          f"{'met' if met else 'MISSED'}); asmk {last['asmk_bytes']:.0f}")
    # One product streams every descriptor once: proportional to the images (from the largest size).
    scores, top, single = (last[name] * ONE_MILLION / last["size"] for name in ("scores", "top", "single"))
    order = last["order"] * ONE_MILLION * math.log(ONE_MILLION) / (last["size"] * math.log(last["size"]))
    asmk = line_at(sizes, [row["asmk"] for row in rows], ONE_MILLION)
    print(f"extrapolation to {ONE_MILLION:,} images (R1M):")
    print(f"  global: index {last['global_bytes'] * ONE_MILLION / 2**30:.1f} GiB (memory-mapped; in RAM when the "
          f"page cache holds it), search {1e3 * (scores + top):.0f} ms per query (scores {1e3 * scores:.0f} ms + "
          f"shortlist {1e3 * top:.0f} ms, proportional), ordering all images {1e3 * order:.0f} ms (n log n), "
          f"one query alone {1e3 * single:.0f} ms, re-rank "
          f"{last['global_rerank']:.2f} s")
    print(f"  asmk: index {last['asmk_bytes'] * ONE_MILLION / 2**30:.1f} GiB, search {1e3 * asmk:.0f} ms per query "
          f"(line fit), re-rank {last['asmk_rerank']:.2f} s")


if __name__ == "__main__":
    main()
