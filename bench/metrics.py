"""evaluate() at R1M scale against its former implementation, in one run.

The former implementation (kept here as the baseline) checked each ranking for repeated images by
sorting the (database x queries) rank array along its strided axis, and found the positions of the
positives and junk images with np.isin over the whole ranking, twice per query and protocol. Now a
count per column checks for repeats and one inverse of each ranking gives every position
(metrics.positions_in). Both run on the same synthetic rankings (70 queries, ~40 easy, ~40 hard,
~80 junk images each), alternated, and must give the same APs.

    python bench/metrics.py [--database 1000000] [--queries 70] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.evaluation.ground_truth import protocol_ground_truth  # noqa: E402
from src.evaluation.metrics import compute_ap, compute_map  # noqa: E402


def former_compute_map(ranks: np.ndarray, gnd: list[dict]) -> np.ndarray:
    """Per-query AP as metrics.compute_map computed it before (sort check, np.isin positions)."""
    sorted_columns = np.sort(ranks, axis=0)
    assert not np.any(sorted_columns[1:] == sorted_columns[:-1])
    aps = np.full(len(gnd), np.nan)
    for query, entry in enumerate(gnd):
        ok, junk = np.asarray(entry["ok"]), np.asarray(entry["junk"])
        positive_positions = np.flatnonzero(np.isin(ranks[:, query], ok))
        junk_positions = np.flatnonzero(np.isin(ranks[:, query], junk))
        aps[query] = compute_ap(positive_positions - np.searchsorted(junk_positions, positive_positions), ok.size)
    return aps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ranks = np.empty((args.database, args.queries), dtype=np.int64)
    raw = []
    for query in range(args.queries):
        ranks[:, query] = rng.permutation(args.database)
        chosen = rng.choice(5000, 160, replace=False)
        raw.append({"easy": chosen[:40], "hard": chosen[40:80], "junk": chosen[80:]})
    gnd = protocol_ground_truth(raw, "medium")
    timings: dict[str, list[float]] = {"former": [], "now": []}
    for _ in range(args.rounds):
        for name in ("former", "now"):
            started = time.perf_counter()
            aps = former_compute_map(ranks, gnd) if name == "former" else compute_map(ranks, gnd)[1]
            timings[name].append(time.perf_counter() - started)
            if name == "former":
                expected = aps
            else:
                np.testing.assert_allclose(aps, expected, rtol=0, atol=1e-12)
    former, now = (statistics.median(timings[name]) for name in ("former", "now"))
    print(f"one protocol, {args.queries} queries x {args.database:,} images (median of {args.rounds}):")
    print(f"  former (sort check + np.isin): {former:7.2f} s")
    print(f"  now (count check + inverse):   {now:7.2f} s   former / now = {former / now:.1f}x, same APs")


if __name__ == "__main__":
    main()
