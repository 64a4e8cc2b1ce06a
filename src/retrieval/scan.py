"""Scanning inverted lists: the ASMK search's inner loop, compiled (numba), on all cores.

For each of a query's words, every entry of the word's list (image number, binary code) gets the
selective kernel of its Hamming distance to the query's code for that word, added to the entry's
image's score. Done in NumPy this took ~20 passes over temporaries as long as the scanned lists
(gather the rows, repeat the query codes, XOR and look up each byte, look up the kernel, bincount):
~38 ns of CPU per entry measured here. One compiled pass takes ~6 ns (bench/retrieval_scale.py
measures both). The entries are split evenly over `threads` threads (a long list is shared), each
summing into its own score array, added up at the end. The result equals the NumPy definition
(tests/retrieval/test_asmk.py checks it against a direct implementation).
"""

from __future__ import annotations

import os

import numba
import numpy as np

# numba's simple thread pool: its OpenMP one spins while idle (as faiss's did: see faiss_setup.py),
# which costs the other threads of a busy machine; scans are started by one thread at a time.
numba.config.THREADING_LAYER = "workqueue"
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


@numba.njit(nogil=True, cache=True)
def _scan_range(offsets: np.ndarray, images: np.ndarray, codes: np.ndarray, words: np.ndarray,
                query_codes: np.ndarray, kernel: np.ndarray, first: int, last: int, scores: np.ndarray) -> int:
    """Entries first..last - 1 of the concatenation of the words' lists, summed into `scores`;
    returns the number of entries whose image number is out of range (skipped: never written)."""
    width = codes.shape[1]
    outside = 0
    skipped = 0  # entries of the lists before the current word
    for position in range(len(words)):
        word = words[position]
        start, length = offsets[word], offsets[word + 1] - offsets[word]
        if skipped + length <= first:
            skipped += length
            continue
        if skipped >= last:
            break
        begin = start + max(first - skipped, 0)
        end = start + min(last - skipped, length)
        for entry in range(begin, end):
            image = images[entry]
            if image >= len(scores):
                outside += 1
                continue
            distance = 0
            for byte in range(width):
                distance += _POPCOUNT[codes[entry, byte] ^ query_codes[position, byte]]
            scores[image] += kernel[distance]
        skipped += length
    return outside


@numba.njit(nogil=True, parallel=True, cache=True)
def _scan_parallel(offsets: np.ndarray, images: np.ndarray, codes: np.ndarray, words: np.ndarray,
                   query_codes: np.ndarray, kernel: np.ndarray, total: int, partial: np.ndarray) -> int:
    threads = partial.shape[0]
    outside = np.zeros(threads, dtype=np.int64)
    for thread in numba.prange(threads):
        outside[thread] = _scan_range(offsets, images, codes, words, query_codes, kernel, total * thread // threads,
                                      total * (thread + 1) // threads, partial[thread])
    return outside.sum()


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def scan_lists(offsets: np.ndarray, images: np.ndarray, codes: np.ndarray, words: np.ndarray,
               query_codes: np.ndarray, kernel: np.ndarray, scores: np.ndarray, threads: int = 1) -> int:
    """Add to `scores` (float64, one per image number) the kernel values of every entry of the lists
    of `words` (int64) against `query_codes` (one row of packed bits per word); returns the number
    of entries scanned. `threads` > 1 splits the entries over that many threads (at most numba's).
    ValueError when an entry's image number is past `scores` (the index's checks rule that out)."""
    total = int((offsets[words + 1] - offsets[words]).sum())
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS, total // 50_000))  # short scans: one thread
    words = np.ascontiguousarray(words, dtype=np.int64)
    query_codes = np.ascontiguousarray(query_codes, dtype=np.uint8)
    if threads == 1:
        outside = _scan_range(offsets, images, codes, words, query_codes, kernel, 0, total, scores)
    else:
        partial = np.zeros((threads, len(scores)), dtype=np.float64)
        numba.set_num_threads(threads)
        outside = _scan_parallel(offsets, images, codes, words, query_codes, kernel, total, partial)
        scores += partial.sum(axis=0)
    if outside:
        raise ValueError(f"{outside} index entries name images past the {len(scores)} indexed")
    return total
