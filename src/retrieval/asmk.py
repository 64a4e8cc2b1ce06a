"""DELF-ASMK*: the aggregated selective match kernel on binarised residuals (Tolias et al. 2013).

The pieces, as the HOW / FIRe reference (jenicek/asmk) uses them:

- a codebook of visual words: k-means centroids of a sample of database descriptors (faiss);
- quantisation: a database descriptor goes to its 1 nearest word, a query descriptor to its 5
  nearest (multiple assignment, which recovers matches split across neighbouring words);
- aggregation: per (image, word), the sum of the residuals (descriptor - centroid) of the image's
  descriptors assigned to the word; binarised by sign (1 bit per dimension, packed with
  np.packbits), which is the "*" of ASMK*;
- the selective match kernel between two binary residuals u, v of the same word: their
  similarity s = sign(u).sign(v) / D = 1 - 2 hamming(u, v) / D, mapped through
  sigma_alpha(s) = sign(s) |s|^alpha if s > tau else 0, with alpha = 3 and tau = 0;
- image similarity: the sum of sigma over the words two images share, divided by the square
  roots of both images' self-similarities. A binary residual's similarity with itself is 1, so
  an image's self-similarity is its number of words.

Large codebooks are trained in two levels (k-means into sqrt(size) cells, then each cell's
descriptors into words), about a 128th of flat k-means at 65,536 words, and searched
through those cells (a faiss inverted file over the centroids, `probes` cells per descriptor):
flat search over 65,536 words would cost 0.3 s per 1000-descriptor query here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model_utils.cli import InputError
from src.retrieval.faiss_setup import faiss

ALPHA = 3.0
THRESHOLD = 0.0
MAX_CODEBOOK_SIZE = 65_536  # the HOW / FIRe reference's codebook
MIN_CODEBOOK_SIZE = 16
WORDS_PER_DATABASE_IMAGE = 16  # default codebook size = this x database images, as a power of two
# k-means sample: this many descriptors per word (faiss's own cap is 256; 16 keeps training of
# 65,536 words under a minute on 2 cores), at most TRAIN_SAMPLE_BYTES of float32.
TRAIN_POINTS_PER_WORD = 16
MIN_TRAIN_POINTS_PER_WORD = 4
TRAIN_SAMPLE_BYTES = 256 << 20
KMEANS_ITERATIONS = 15
# Up to this size the codebook is searched exactly; above, through its two-level cells.
FLAT_CODEBOOK_MAX = 4096
# Cells probed per descriptor (of 256 at 65,536 words). On the benchmarks' synthetic descriptors
# (spread evenly over the sphere: the hardest case) 8 probes find the exact nearest word for 84 %
# of descriptors and 78 % of the exact 5 nearest, 16 probes 94 % / 90 % at twice the cost; the
# ASMK scores barely change (lowest positive / highest distractor score 2.98 vs 3.17 at 2,000
# images) because a query and a database descriptor of one scene point share probed cells.
DATABASE_PROBES = 8
QUERY_PROBES = 8
QUERY_ASSIGNMENTS = 5
# Bits set in each byte value: Hamming distances of packed codes by table look-up.
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def default_codebook_size(num_images: int) -> int:
    """WORDS_PER_DATABASE_IMAGE words per database image, rounded to a power of two, within
    [MIN_CODEBOOK_SIZE, MAX_CODEBOOK_SIZE]: 65,536 words from ~2,900 images on (Oxford5k, R1M)."""
    wanted = max(1, num_images) * WORDS_PER_DATABASE_IMAGE
    return int(min(max(2 ** round(math.log2(wanted)), MIN_CODEBOOK_SIZE), MAX_CODEBOOK_SIZE))


def _kmeans(points: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, D) faiss k-means centroids of the points (count <= len(points))."""
    kmeans = faiss.Kmeans(
        points.shape[1], count, niter=KMEANS_ITERATIONS, seed=seed,
        # Use every point given (the sample is already sized), and no "too few points" warning.
        max_points_per_centroid=max(1, math.ceil(len(points) / count)), min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    return kmeans.centroids


@dataclass(eq=False)
class Codebook:
    """Visual words (centroids) and the faiss index that assigns descriptors to them.

    `cells` (C, D) are the first-level centres of a two-level codebook; the words are then
    searched through them (faiss.IndexIVFFlat over the centroids). None: exact search.
    """

    centroids: np.ndarray  # (W, D) float32
    cells: np.ndarray | None = None  # (C, D) float32
    _search: faiss.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or not len(self.centroids):
            raise InputError(f"a codebook needs a (words, dim) array of centroids, got shape {self.centroids.shape}")
        dim = self.dim
        if self.cells is None:
            self._search = faiss.IndexFlatL2(dim)
        else:
            self.cells = np.ascontiguousarray(self.cells, dtype=np.float32)
            quantizer = faiss.IndexFlatL2(dim)
            quantizer.add(self.cells)
            # faiss's Python wrapper keeps the quantizer alive as long as the IVF index.
            self._search = faiss.IndexIVFFlat(quantizer, dim, len(self.cells))
            self._search.is_trained = True  # the cells are the quantizer's centroids already
        self._search.add(self.centroids)  # labels = word ids, in order

    @property
    def size(self) -> int:
        return len(self.centroids)

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def assign(self, descriptors: np.ndarray, count: int, probes: int = QUERY_PROBES) -> np.ndarray:
        """(N, count) ids of each descriptor's `count` nearest words, nearest first; -1 where the
        probed cells held fewer words than asked (never with the sizes used here)."""
        descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
        count = min(count, self.size)
        if descriptors.ndim != 2 or (len(descriptors) and descriptors.shape[1] != self.dim):
            raise InputError(f"descriptors of shape {descriptors.shape} do not fit a {self.dim}-D codebook")
        if not len(descriptors):
            return np.zeros((0, count), dtype=np.int64)
        if self.cells is not None:
            self._search.nprobe = min(probes, len(self.cells))
        _, words = self._search.search(descriptors, count)
        return words


def train_codebook(sample: np.ndarray, size: int, seed: int = 0) -> Codebook:
    """k-means codebook of `size` words from a sample of descriptors (at least `size` rows).

    Up to FLAT_CODEBOOK_MAX words: flat k-means. Above: two levels, C = 2^ceil(log2(size) / 2)
    cells, then each cell's sample split into words in proportion to its share of the sample.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < size or size < 1:
        raise InputError(f"cannot train {size} words from a sample of shape {sample.shape}")
    if size <= FLAT_CODEBOOK_MAX:
        return Codebook(_kmeans(sample, size, seed))
    num_cells = 2 ** math.ceil(math.log2(size) / 2)
    cells = _kmeans(sample, num_cells, seed)
    _, cell_of_point = faiss.knn(sample, cells, 1)
    cell_of_point = cell_of_point[:, 0]
    members = np.bincount(cell_of_point, minlength=num_cells)
    # Words per cell in proportion to its points: at least 1 for a non-empty cell, never more than
    # its points, adding up to `size` (largest remainders first).
    share = members * (size / len(sample))
    words = np.minimum(np.maximum(np.floor(share).astype(np.int64), members > 0), members)
    for cell in np.argsort(share - np.floor(share), kind="stable")[::-1]:
        if words.sum() >= size:
            break
        if words[cell] < members[cell]:
            words[cell] += 1
    while words.sum() > size:  # the "at least 1" rule overshot: take from the largest
        words[np.argmax(words)] -= 1
    order = np.argsort(cell_of_point, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(members)])
    centroids = [
        _kmeans(sample[order[bounds[cell] : bounds[cell + 1]]], int(words[cell]), seed + 1 + cell)
        for cell in range(num_cells) if words[cell]
    ]
    return Codebook(np.concatenate(centroids), cells)


def aggregate_residuals(
    descriptors: np.ndarray, assignments: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(words, residuals): the distinct words of `assignments` (N, k; -1 = none), ascending, and
    per word the sum of (descriptor - centroid) over the descriptors assigned to it, (U, D) float32."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    assignments = np.asarray(assignments, dtype=np.int64)
    per_row = assignments.shape[1] if assignments.ndim == 2 else 1
    rows = np.repeat(np.arange(len(descriptors)), per_row)
    words = assignments.ravel()
    valid = words >= 0
    rows, words = rows[valid], words[valid]
    if not len(words):
        return np.zeros(0, dtype=np.int64), np.zeros((0, centroids.shape[1]), dtype=np.float32)
    order = np.argsort(words, kind="stable")
    rows, words = rows[order], words[order]
    starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
    residuals = np.add.reduceat(descriptors[rows] - centroids[words], starts, axis=0)
    return words[starts], residuals.astype(np.float32, copy=False)


def binarize(residuals: np.ndarray) -> np.ndarray:
    """(U, ceil(D / 8)) uint8: the residuals' signs, 1 bit per dimension (1 = positive), packed."""
    return np.packbits(np.asarray(residuals) > 0, axis=1)


def hamming_distances(codes_1: np.ndarray, codes_2: np.ndarray) -> np.ndarray:
    """Row-wise number of differing bits of packed codes, (E,): uint8 up to 31 bytes, else uint16."""
    # Byte column by byte column, looked up with np.take: ~1.7x faster than a table lookup of the
    # whole (E, B) XOR and a sum over rows of a few bytes.
    width = codes_1.shape[-1]
    distances = np.take(_POPCOUNT, codes_1[..., 0] ^ codes_2[..., 0])  # uint8, like the table
    if width >= 32:  # over 255 bits
        distances = distances.astype(np.uint16)
    for column in range(1, width):
        distances += np.take(_POPCOUNT, codes_1[..., column] ^ codes_2[..., column])
    return distances


def binary_similarity(codes_1: np.ndarray, codes_2: np.ndarray, dim: int) -> np.ndarray:
    """Row-wise sign(u).sign(v) / D of packed codes: 1 - 2 hamming / D (padding bits are 0 in both)."""
    return 1.0 - (2.0 / dim) * hamming_distances(codes_1, codes_2)


def selective_kernel(similarity: np.ndarray, alpha: float = ALPHA, threshold: float = THRESHOLD) -> np.ndarray:
    """sigma_alpha(s) = sign(s) |s|^alpha where s > threshold, else 0."""
    similarity = np.asarray(similarity, dtype=np.float64)
    return np.where(similarity > threshold, np.sign(similarity) * np.abs(similarity) ** alpha, 0.0)


def kernel_of_hamming(dim: int, alpha: float = ALPHA, threshold: float = THRESHOLD) -> np.ndarray:
    """(dim + 1,) selective_kernel(binary_similarity) for every Hamming distance 0..dim: the kernel
    of two D-bit codes takes one of D + 1 values, so a search looks it up."""
    return selective_kernel(1.0 - (2.0 / dim) * np.arange(dim + 1), alpha, threshold)


def image_words(
    descriptors: np.ndarray, codebook: Codebook, assignments: int = 1, probes: int = DATABASE_PROBES
) -> tuple[np.ndarray, np.ndarray]:
    """(words, codes) of one image: its distinct words and each word's binarised residual sum."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    if not len(descriptors):
        return np.zeros(0, dtype=np.int64), np.zeros((0, (codebook.dim + 7) // 8), dtype=np.uint8)
    words, residuals = aggregate_residuals(
        descriptors, codebook.assign(descriptors, assignments, probes), codebook.centroids
    )
    return words, binarize(residuals)
