"""Retrieval at scale: asmk vs the former fast mode vs exhaustive (sampled) on streamed synthetic databases, in ONE run.

The database (bench/synthetic_delf.py) is generated image by image and never held whole: the
asmk index is built by streaming at the first size, then the next images are added to it
(incremental add, as a growing collection would be); the former fast mode's faiss vote index
(bench/vote_baseline.py) holds every descriptor (its nature), grown the same way, and is skipped
above --fast_max_gb. Each size prints, per mode: build time (cumulative), index bytes per image,
per-query search and re-rank times (medians over the queries), and positives found (of each
query's 20 positives, how many are ranked above every distractor). Re-ranking verifies the top
--shortlist_size images with one batched match (features regenerated first, not timed; reading
them from a feature store is timed by bench/retrieval.py). Exhaustive verifies each query's
positives plus --exhaustive_pairs random distractors: its time is EXTRAPOLATED as per-pair cost
x images, and a positive counts as found when its inliers exceed every sampled distractor's.
Last, everything is extrapolated to 1M images (R1M's scale): bytes and per-image build cost
linearly, search time by a line fitted over the sizes (search_at).

    python bench/retrieval_scale.py [--sizes 10000 30000 100000] [--features 300] [--queries 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_delf import DIM, POSITIVES_PER_QUERY, SyntheticDatabase, SyntheticSource  # noqa: E402
from bench.vote_baseline import DescriptorIndex, build_descriptor_index, vote_scores  # noqa: E402
from src.matching.verify import match_features_batch  # noqa: E402
from src.retrieval.index_build import build_index  # noqa: E402
from src.retrieval.inverted_file import AsmkIndex  # noqa: E402
from src.retrieval.rerank import rerank_by_inliers, shortlist  # noqa: E402

ONE_MILLION = 1_000_000


@dataclasses.dataclass
class Row:
    size: int
    mode: str
    build_seconds: float = float("nan")
    bytes_per_image: float = float("nan")
    search_seconds: float = float("nan")
    rerank_seconds: float = float("nan")
    found: int = 0
    wanted: int = 0
    note: str = ""

    @property
    def total(self) -> float:
        return self.search_seconds + self.rerank_seconds


def shortlist_and_rerank(database: SyntheticDatabase, query, scores: np.ndarray, shortlist_size: int):
    """(re-rank seconds, final ranking): the top `shortlist_size` verified in one batch."""
    candidates = shortlist(scores, [], shortlist_size)
    features = [database.image(int(number)) for number in candidates]  # regenerated, not timed
    started = time.perf_counter()
    results = match_features_batch(features, query)
    seconds = time.perf_counter() - started
    inliers = {int(image): result.num_inliers for image, result in zip(candidates, results, strict=True)}
    return seconds, rerank_by_inliers(scores, [], shortlist_size, inliers.__getitem__)


def count_found(ranking: np.ndarray, positives: np.ndarray) -> int:
    """Positives ranked above every distractor: positives among the first len(positives)."""
    return int(np.isin(ranking[: len(positives)], positives).sum())


def measure_queries(database, queries, size, score, shortlist_size, row: Row) -> Row:
    searches, reranks = [], []
    for number, query in enumerate(queries):
        started = time.perf_counter()
        scores = score(query)
        searches.append(time.perf_counter() - started)
        seconds, ranking = shortlist_and_rerank(database, query, scores, shortlist_size)
        reranks.append(seconds)
        positives = database.positives(number, size)
        row.found += count_found(ranking, positives)
        row.wanted += len(positives)
    row.search_seconds, row.rerank_seconds = statistics.median(searches), statistics.median(reranks)
    return row


def grow_fast_index(index: DescriptorIndex | None, database: SyntheticDatabase, start: int, stop: int,
                    seed: int) -> DescriptorIndex:
    """The fast mode's index over images [0, stop): built at the first size, then added to."""
    chunk = 2000
    if index is None:
        descriptors = np.empty((stop * database.num_features, DIM), np.float32)
        for first in range(0, stop, chunk):
            block = [database.image(n).descriptors for n in range(first, min(first + chunk, stop))]
            descriptors[first * database.num_features : first * database.num_features + sum(map(len, block))] = \
                np.concatenate(block)
        index = build_descriptor_index(descriptors, np.full(stop, database.num_features), seed=seed)
        del descriptors
        return index
    for first in range(start, stop, chunk):
        index.searcher.add(np.concatenate([database.image(n).descriptors
                                           for n in range(first, min(first + chunk, stop))]))
    counts = np.concatenate([index.features_per_image, np.full(stop - start, database.num_features)])
    return dataclasses.replace(index, features_per_image=counts,
                               image_of_row=np.repeat(np.arange(stop), counts))


def measure_exhaustive(database, queries, size, pairs: int, rng: np.random.Generator) -> tuple[Row, float]:
    row, per_pair = Row(size, "exhaustive", note=f"sampled: positives + {pairs} distractors a query"), []
    for number, query in enumerate(queries):
        positives = database.positives(number, size)
        distractors = rng.choice(np.setdiff1d(np.arange(size), positives), pairs, replace=False)
        images = np.concatenate([positives, distractors])
        features = [database.image(int(n)) for n in images]
        started = time.perf_counter()
        results = match_features_batch(features, query)
        per_pair.append((time.perf_counter() - started) / len(images))
        inliers = np.array([r.num_inliers for r in results])
        row.found += int((inliers[: len(positives)] > inliers[len(positives) :].max()).sum())
        row.wanted += len(positives)
    pair_seconds = statistics.median(per_pair)
    row.rerank_seconds, row.search_seconds = pair_seconds * size, 0.0
    return row, pair_seconds


def asmk_index_scores(index: AsmkIndex):
    return lambda query: index.scores(query.descriptors)


def fast_index_scores(index: DescriptorIndex):
    return lambda query: vote_scores(index, query.descriptors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="database sizes")
    parser.add_argument("--features", type=int, default=300, help="features per image (DELF keeps up to 1000)")
    parser.add_argument("--queries", type=int, default=5, help="queries per size (medians reported)")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC")
    parser.add_argument("--exhaustive_pairs", type=int, default=200, help="distractors verified per query")
    parser.add_argument("--fast_max_gb", type=float, default=6.0, help="skip fast above this descriptor memory")
    parser.add_argument("--codebook_size", type=int, default=0, help="asmk words (0 = the library's default)")
    parser.add_argument("--work_dir", default="", help="where the asmk index goes (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes))
    if sizes[0] < 20 * POSITIVES_PER_QUERY or args.queries < 1:
        parser.error(f"sizes must be >= {20 * POSITIVES_PER_QUERY} and --queries >= 1")

    database = SyntheticDatabase(args.features, positive_period=sizes[0] // POSITIVES_PER_QUERY, seed=args.seed)
    source = SyntheticSource(database)
    queries = [database.query(q) for q in range(args.queries)]
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="retrieval_scale_"))
    index_dir = work_dir / "synthetic.asmk"
    rng = np.random.default_rng(args.seed + 1)
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores")
    print(f"synthetic database: {args.features} features x {DIM}-D per image, {POSITIVES_PER_QUERY} positives per "
          f"query, {args.queries} queries, shortlist {args.shortlist_size}; sizes {sizes}")
    match_features_batch([queries[0]], queries[-1])  # warm-up

    rows: list[Row] = []
    asmk_index: AsmkIndex | None = None
    fast_index: DescriptorIndex | None = None
    asmk_build = fast_build = 0.0
    pair_seconds = float("nan")
    previous = 0
    try:
        for size in sizes:
            ids = [database.image_id(n) for n in range(size)]
            started = time.perf_counter()
            if asmk_index is None:
                asmk_index = build_index(index_dir, source, ids, codebook_size=args.codebook_size, seed=args.seed,
                                         progress=True)
            else:
                asmk_index.add(source, ids[previous:], progress=True)
                asmk_index.merge()
            asmk_build += time.perf_counter() - started
            row = Row(size, "asmk", asmk_build, asmk_index.num_bytes() / size,
                      note=f"{asmk_index.codebook.size} words, trained at {sizes[0]} images")
            rows.append(measure_queries(database, queries, size, asmk_index_scores(asmk_index), args.shortlist_size,
                                        row))

            fast_gb = size * args.features * DIM * 4 / 2**30
            if fast_gb <= args.fast_max_gb:
                started = time.perf_counter()
                fast_index = grow_fast_index(fast_index, database, previous, size, args.seed)
                fast_build += time.perf_counter() - started
                row = Row(size, "fast", fast_build, fast_gb * 2**30 / size,
                          note="exact" if fast_index.exact else "faiss IVF, 8 probes")
                rows.append(measure_queries(database, queries, size, fast_index_scores(fast_index),
                                            args.shortlist_size, row))
            else:
                fast_index = None
                rows.append(Row(size, "fast", note=f"skipped: needs {fast_gb:.1f} GB of descriptors in memory"))

            row, pair_seconds = measure_exhaustive(database, queries, size, args.exhaustive_pairs, rng)
            row.bytes_per_image = args.features * (DIM + 4) * 4  # features read from the store each query
            rows.append(row)
            print_rows(rows[-3:], header=size == sizes[0])
            previous = size
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(f"load average at the end: {os.getloadavg()}")
    print_summary(rows, args, pair_seconds)


def print_rows(rows: list[Row], header: bool) -> None:
    if header:
        print(f"{'images':>8} {'mode':>10} {'build s':>8} {'bytes/image':>11} {'search ms':>9} {'rerank s':>8} "
              f"{'total s/q':>9} {'found':>9}  note")
    def number(value: float, digits: int, scale: float = 1.0) -> str:
        return "-" if np.isnan(value) else f"{scale * value:.{digits}f}"

    for row in rows:
        found = f"{row.found}/{row.wanted}" if row.wanted else "-"
        print(f"{row.size:>8} {row.mode:>10} {number(row.build_seconds, 1):>8} {number(row.bytes_per_image, 0):>11} "
              f"{number(row.search_seconds, 1, 1e3):>9} {number(row.rerank_seconds, 3):>8} {number(row.total, 3):>9} "
              f"{found:>9}  {row.note}")


def search_at(size: int, rows: list[Row]) -> tuple[float, str]:
    """Search seconds at `size` from a line a + b * images fitted to the measured sizes (a, b >= 0:
    a fixed part such as quantising the query, a part scanning lists that grow with the
    database); proportional to the largest measured size when the fit is not of that form."""
    sizes = np.array([r.size for r in rows], float)
    seconds = np.array([r.search_seconds for r in rows], float)
    if len(rows) > 1:
        slope, intercept = np.polyfit(sizes, seconds, 1)
        if slope >= 0 and intercept >= 0:
            return float(intercept + slope * size), "line fit"
    return float(seconds[-1] * size / sizes[-1]), f"proportional to {int(sizes[-1])} images"


def print_summary(rows: list[Row], args, pair_seconds: float) -> None:
    asmk = [r for r in rows if r.mode == "asmk"]
    fast = [r for r in rows if r.mode == "fast" and r.wanted]
    print()
    if len(asmk) > 1:
        ratio = asmk[-1].search_seconds / asmk[0].search_seconds
        print(f"asmk search {asmk[0].size} -> {asmk[-1].size} images ({asmk[-1].size / asmk[0].size:.0f}x): "
              f"{ratio:.1f}x the time ({'sub-linear' if ratio < asmk[-1].size / asmk[0].size else 'NOT sub-linear'})")
    print(f"extrapolation to {ONE_MILLION:,} images ({args.features} features per image; "
          f"x{1000 / args.features:.1f} entries for DELF's 1000, bounded by the words an image has):")
    last = asmk[-1]
    if len(asmk) > 1:
        add_rate = (asmk[-1].build_seconds - asmk[-2].build_seconds) / (asmk[-1].size - asmk[-2].size)
        search, how = search_at(ONE_MILLION, asmk)
        print(f"  asmk: index {last.bytes_per_image * ONE_MILLION / 2**30:.1f} GB "
              f"({last.bytes_per_image:.0f} bytes per image), build {add_rate * ONE_MILLION / 3600:.1f} h "
              f"({1e3 * add_rate:.2f} ms per image), search {1e3 * search:.0f} ms per query ({how}), "
              f"re-rank {last.rerank_seconds:.2f} s, total {search + last.rerank_seconds:.2f} s per query")
    if fast:
        search, how = search_at(ONE_MILLION, fast)
        print(f"  fast: {ONE_MILLION * args.features * DIM * 4 / 2**30:.0f} GB of descriptors in memory, search "
              f"{search:.1f} s per query ({how})")
    print(f"  exhaustive: {pair_seconds * ONE_MILLION / 3600:.1f} h per query "
          f"({1e3 * pair_seconds:.2f} ms per pair, batched)")


if __name__ == "__main__":
    main()
