"""Retrieval at scale: ASMK search variants and re-ranking on streamed synthetic databases, power-law
and uniform, in ONE run, with the R1M extrapolation.

Per distribution (bench/synthetic_delf.py: `powerlaw`, the realistic one, and `uniform`), the
database is generated image by image and never held whole: the asmk index is built by streaming
at the first size, then the next images are added to it (incremental add, as a growing
collection would be) and merged. At each size, every query is searched with every variant of
the search (in an order rotated from query to query, so load and caches favour none):

- numpy: the scan as it was before the compiled kernel (NumPy passes over gathered rows); the
  reference for speed and, with the same words, for scores;
- kernel: the compiled scan (src/retrieval/scan.py) on one thread, then on --threads;
- +stop: + a stop list (words whose lists hold more than --stop_word_share of the images);
- +stop+assign: + a query descriptor's 2nd-5th nearest words searched only when their lists hold
  at most --assignment_share of the images. With the default arguments this is the library's
  default (RetrievalConfig).

Each variant's shortlist (--shortlist_size) is then re-ranked with one batched RANSAC match
(features regenerated first, not timed; reading them from a feature store is timed by
bench/retrieval.py). Printed per size and variant: search time and entries scanned (medians over
the queries; entries do not move with the machine's load), re-rank time, mAP of the ASMK ranking
alone and after re-ranking (revisitop's AP, the views of a query's scene as its positives), and
build time and index bytes per image. Exhaustive RANSAC is timed on the positives +
--exhaustive_pairs sampled distractors per query and extrapolated. Last, everything is
extrapolated to 1M images (R1M's scale): bytes and build time per image linearly, search time
by a line fitted over the sizes (search_at), re-rank time as measured at the largest size.

    python bench/retrieval_scale.py [--distributions powerlaw uniform] [--sizes 10000 30000 100000]
        [--features 800] [--queries 20]
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_delf import DIM, DISTRIBUTIONS, POSITIVES_PER_QUERY, SyntheticSource  # noqa: E402
from model_utils.config import RetrievalConfig  # noqa: E402
from src.evaluation.metrics import compute_ap  # noqa: E402
from src.matching.verify import match_features_batch  # noqa: E402
from src.retrieval import asmk  # noqa: E402
from src.retrieval.index_build import build_index  # noqa: E402
from src.retrieval.inverted_file import AsmkIndex  # noqa: E402
from src.retrieval.rerank import rerank_by_inliers, shortlist  # noqa: E402
from src.retrieval.scan import default_threads  # noqa: E402

ONE_MILLION = 1_000_000
DEFAULTS = RetrievalConfig()


@dataclasses.dataclass
class Variant:
    """One way to search: which words (stop list, assignment share) and which scan."""

    name: str
    stop_word_share: float = 1.0
    assignment_share: float = 1.0
    threads: int = 1
    numpy_scan: bool = False


@dataclasses.dataclass
class Row:
    distribution: str
    size: int
    variant: str
    build_seconds: float = float("nan")
    bytes_per_image: float = float("nan")
    search: list[float] = dataclasses.field(default_factory=list)
    entries: list[int] = dataclasses.field(default_factory=list)
    rerank: list[float] = dataclasses.field(default_factory=list)
    asmk_ap: list[float] = dataclasses.field(default_factory=list)
    final_ap: list[float] = dataclasses.field(default_factory=list)

    @property
    def search_seconds(self) -> float:
        return statistics.median(self.search)

    @property
    def rerank_seconds(self) -> float:
        return statistics.median(self.rerank)


def numpy_scores(index: AsmkIndex, words: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The scan before the compiled kernel: gather the lists' rows, then NumPy passes over them."""
    scores = np.zeros(len(index.image_ids))
    kernel = asmk.kernel_of_hamming(index.codebook.dim)
    for segment in index.segments:
        starts, stops = segment.offsets[words], segment.offsets[words + 1]
        lengths = stops - starts
        total = int(lengths.sum())
        if total:
            rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
            hamming = asmk.hamming_distances(np.take(segment.codes, rows, axis=0), np.repeat(codes, lengths, axis=0))
            scores += np.bincount(np.take(segment.images, rows), weights=kernel[hamming], minlength=len(scores))
    with np.errstate(divide="ignore", invalid="ignore"):
        scores /= np.sqrt(index.words_per_image * len(words))
    return np.nan_to_num(scores, nan=0.0, posinf=0.0)


def search(index: AsmkIndex, variant: Variant, descriptors: np.ndarray) -> tuple[np.ndarray, int]:
    """(scores, entries scanned) of one query with one variant (AsmkIndex.scores, in its two steps)."""
    index.stop_words = np.flatnonzero(index.populated_words(variant.stop_word_share))
    words, codes = index.query_words(descriptors, asmk.QUERY_ASSIGNMENTS, variant.assignment_share)
    scores = numpy_scores(index, words, codes) if variant.numpy_scan else \
        index.scores_of_words(words, codes, threads=variant.threads)
    return scores, int(sum((s.offsets[words + 1] - s.offsets[words]).sum() for s in index.segments))


def average_precision(ranking: np.ndarray, positives: np.ndarray) -> float:
    return compute_ap(np.flatnonzero(np.isin(ranking, positives)), len(positives))


def measure(database, index: AsmkIndex, queries, size: int, variants: list[Variant], rows: dict[str, Row],
            shortlist_size: int) -> None:
    """Search every query with every variant (rotated order), then re-rank each variant's shortlist."""
    for number, query in enumerate(queries):
        positives = database.positives(number, size)
        results = {}
        for k in range(len(variants)):
            variant = variants[(number + k) % len(variants)]
            started = time.perf_counter()
            scores, entries = search(index, variant, query.descriptors)
            rows[variant.name].search.append(time.perf_counter() - started)
            rows[variant.name].entries.append(entries)
            results[variant.name] = scores
        for variant in variants:
            scores = results[variant.name]
            row = rows[variant.name]
            row.asmk_ap.append(average_precision(np.lexsort((np.arange(size), -scores)), positives))
            candidates = shortlist(scores, [], shortlist_size)
            features = [database.image(int(n)) for n in candidates]  # regenerated, not timed
            started = time.perf_counter()
            verified = match_features_batch(features, query)
            row.rerank.append(time.perf_counter() - started)
            inliers = {int(n): result.num_inliers for n, result in zip(candidates, verified, strict=True)}
            row.final_ap.append(average_precision(rerank_by_inliers(scores, [], shortlist_size, inliers.__getitem__),
                                                  positives))


def exhaustive_pair_seconds(database, queries, size: int, pairs: int, rng: np.random.Generator) -> tuple[float, float]:
    """(RANSAC seconds per pair, batched; mAP of the sampled ranking: positives among `pairs` distractors)."""
    per_pair, aps = [], []
    for number, query in enumerate(queries):
        positives = database.positives(number, size)
        distractors = rng.choice(np.setdiff1d(np.arange(size), positives), pairs, replace=False)
        images = np.concatenate([positives, distractors])
        features = [database.image(int(n)) for n in images]
        started = time.perf_counter()
        results = match_features_batch(features, query)
        per_pair.append((time.perf_counter() - started) / len(images))
        inliers = np.array([r.num_inliers for r in results])
        aps.append(average_precision(images[np.lexsort((np.arange(len(images)), -inliers))], positives))
    return statistics.median(per_pair), float(np.mean(aps))


def variants_of(args) -> list[Variant]:
    threads = args.threads or default_threads()
    return [
        Variant("numpy", numpy_scan=True),
        Variant("kernel", threads=1),
        Variant(f"kernel x{threads}", threads=threads),
        Variant("+stop", stop_word_share=args.stop_word_share, threads=threads),
        Variant("+stop+assign", stop_word_share=args.stop_word_share, assignment_share=args.assignment_share,
                threads=threads),
    ]


def run_distribution(name: str, args, work_dir: Path) -> tuple[list[Row], float, float]:
    sizes = sorted(set(args.sizes))
    database = DISTRIBUTIONS[name](args.features, positive_period=sizes[0] // POSITIVES_PER_QUERY, seed=args.seed)
    source = SyntheticSource(database)
    queries = [database.query(q) for q in range(args.queries)]
    variants = variants_of(args)
    rng = np.random.default_rng(args.seed + 1)
    index, build, previous, all_rows = None, 0.0, 0, []
    for size in sizes:
        ids = [database.image_id(n) for n in range(size)]
        started = time.perf_counter()
        if index is None:
            index = build_index(work_dir / f"{name}.asmk", source, ids, seed=args.seed, progress=True)
        else:
            index.add(source, ids[previous:], progress=True)
            index.merge()
        build += time.perf_counter() - started
        rows = {v.name: Row(name, size, v.name, build, index.num_bytes() / size) for v in variants}
        measure(database, index, queries, size, variants, rows, args.shortlist_size)
        pair_seconds, exhaustive_ap = exhaustive_pair_seconds(database, queries, size, args.exhaustive_pairs, rng) \
            if args.exhaustive_pairs else (float("nan"), float("nan"))
        print_rows(list(rows.values()), header=size == sizes[0] and name == args.distributions[0])
        print(f"{'':>8} {name:>8} {size:>7}  exhaustive RANSAC: {pair_seconds * size:.1f} s per query "
              f"(extrapolated), mAP {100 * exhaustive_ap:.1f} on positives + {args.exhaustive_pairs} sampled "
              f"distractors; {index.codebook.size} words, largest list {index.word_counts.max() / size:.0%} of "
              f"the images", flush=True)
        all_rows += rows.values()
        previous = size
    return all_rows, pair_seconds, exhaustive_ap


def print_rows(rows: list[Row], header: bool) -> None:
    if header:
        print(f"{'variant':>14} {'distrib.':>8} {'images':>7} {'build s':>8} {'B/image':>7} {'search ms':>9} "
              f"{'entries':>9} {'rerank s':>8} {'total s':>7} {'mAP asmk':>8} {'mAP final':>9}")
    for row in rows:
        print(f"{row.variant:>14} {row.distribution:>8} {row.size:>7} {row.build_seconds:>8.1f} "
              f"{row.bytes_per_image:>7.0f} {1e3 * row.search_seconds:>9.1f} {statistics.median(row.entries):>9.0f} "
              f"{row.rerank_seconds:>8.3f} {row.search_seconds + row.rerank_seconds:>7.3f} "
              f"{100 * np.mean(row.asmk_ap):>8.2f} {100 * np.mean(row.final_ap):>9.2f}", flush=True)


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


def print_summary(rows: list[Row], pair_seconds: float, features: int) -> None:
    by_variant: dict[str, list[Row]] = {}
    for row in rows:
        by_variant.setdefault(row.variant, []).append(row)
    distribution = rows[0].distribution
    print(f"\n{distribution}: extrapolation to {ONE_MILLION:,} images ({features} features per image):")
    reference = by_variant["numpy"][-1]
    for name, measured in by_variant.items():
        first, last = measured[0], measured[-1]
        growth = last.search_seconds / first.search_seconds
        search, how = search_at(ONE_MILLION, measured)
        if len(measured) > 1:
            add_rate = (last.build_seconds - measured[-2].build_seconds) / (last.size - measured[-2].size)
        else:
            add_rate = last.build_seconds / last.size
        final, asmk_alone = 100 * np.mean(last.final_ap), 100 * np.mean(last.asmk_ap)
        print(f"  {name:>14}: search {first.size}->{last.size} images {growth:.1f}x the time; R1M: search "
              f"{1e3 * search:.0f} ms ({how}) + re-rank {last.rerank_seconds:.3f} s = "
              f"{search + last.rerank_seconds:.3f} s per query; mAP at {last.size} images {final:.2f} "
              f"({final - 100 * np.mean(reference.final_ap):+.2f} vs numpy), ASMK alone {asmk_alone:.2f} "
              f"({asmk_alone - 100 * np.mean(reference.asmk_ap):+.2f})")
    per_image = reference.bytes_per_image
    print(f"  index {per_image * ONE_MILLION / 2**30:.1f} GB ({per_image:.0f} bytes per image), build "
          f"{add_rate * ONE_MILLION / 3600:.1f} h ({1e3 * add_rate:.2f} ms per image added, generating "
          f"the synthetic images included); exhaustive RANSAC {pair_seconds * ONE_MILLION / 3600:.1f} h per query")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distributions", nargs="+", default=["powerlaw", "uniform"], choices=sorted(DISTRIBUTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="database sizes")
    parser.add_argument("--features", type=int, default=800, help="features per image (DELF keeps up to 1000)")
    parser.add_argument("--queries", type=int, default=20, help="queries per size (medians and mAP over them)")
    parser.add_argument("--shortlist_size", type=int, default=100, help="images re-ranked by RANSAC")
    parser.add_argument("--exhaustive_pairs", type=int, default=100, help="distractors verified per query (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="scan threads of the parallel variants (0: every core)")
    parser.add_argument("--stop_word_share", type=float, default=DEFAULTS.stop_word_share,
                        help="the +stop variants' stop list (default: the library's)")
    parser.add_argument("--assignment_share", type=float, default=DEFAULTS.assignment_share,
                        help="the +stop+assign variant's share (default: the library's)")
    parser.add_argument("--work_dir", default="", help="where the indexes go and stay (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    if min(args.sizes) < 20 * POSITIVES_PER_QUERY or args.queries < 1:
        parser.error(f"sizes must be >= {20 * POSITIVES_PER_QUERY} and --queries >= 1")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="retrieval_scale_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores")
    print(f"synthetic databases: {args.features} features x {DIM}-D per image, {POSITIVES_PER_QUERY} positives per "
          f"query, {args.queries} queries, shortlist {args.shortlist_size}; sizes {sorted(set(args.sizes))}; "
          f"defaults {DEFAULTS}")
    summaries: list[Callable[[], None]] = []
    try:
        for name in args.distributions:
            rows, pair_seconds, _ = run_distribution(name, args, work_dir)
            summaries.append(lambda rows=rows, pair_seconds=pair_seconds: print_summary(rows, pair_seconds,
                                                                                        args.features))
            if not args.work_dir:
                shutil.rmtree(work_dir / f"{name}.asmk", ignore_errors=True)  # room for the next one
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    for summary in summaries:
        summary()
    print(f"load average at the end: {os.getloadavg()}; run time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
