"""The ASMK index on disk: codebook + inverted file over words, checked, memory-mapped.

Layout of an index directory (by default `<index store>.asmk` beside the feature store), every
file written and checked through `index_files.IndexFiles`:

- `index.json`: the manifest and commit point (written atomically last, so an interrupted build
  or add leaves the previous index): descriptor size, codebook size, the segments, the image
  numbers removed since the last merge, and every file's size and CRC-32;
- `codebook.npy` (W, D) float32 centroids, `cells.npy` (C, D) for a two-level codebook;
- `stop_words.npy` the stop list (word ids), decided from the word statistics (set_stop_words);
- the segments: the images of one build or add step, numbered consecutively, their entries
  grouped by word (segments.py: offsets, image numbers, codes, words per image, and each image's
  id, feature settings_hash and feature checksum: an image whose features changed is indexed
  again).

Every .npy is read with allow_pickle=False; entries and codes are memory-mapped, so a query
touches only the lists of its words. Per indexed image the files hold 4 + ceil(D / 8) bytes per
distinct word (about 9 KB for 1000 40-D descriptors) and a few bytes of bookkeeping.

Opening checks every file's size, shape and dtype, the segments' consistency (offsets ascending
from 0 to the number of entries, entries per image adding up to it, one listing per image) and,
once per file identity, every file's CRC-32 and the image numbers' range (IndexFiles.verify).

Adding streams ADD_BATCH images at a time and never holds all descriptors: one batch plus at most
SEGMENT_ENTRIES buffered entries (0.4 GB measured at D = 40 including the sort); a segment is
written whenever the buffer fills. Segments are merged into one after a build and when more
than MAX_SEGMENTS accumulate (segments.write_merged_segment: streamed, plain writes after a check
for room).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from src.retrieval import asmk, index_files, segments
from src.retrieval.index_files import MANIFEST_FILE, IndexFiles, append_numbered, string_list
from src.retrieval.scan import scan_lists

LOGGER = logging.getLogger("delf.retrieval")

FORMAT = "delf-asmk-index-v2"  # v2: checksums, per-image feature checksums, removed images
OLDER_FORMATS = ("delf-asmk-index-v1",)
WHAT = "ASMK index"
STOP_WORDS_FILE = "stop_words.npy"
SEGMENT_ENTRIES = 1 << 23  # ~8,500 images of 1000 features; ~140 MB buffered at D = 40
MAX_SEGMENTS = 8
ADD_BATCH = 64  # images whose descriptors are assigned to words in one call
# A word is "populated" (a stop word, or searched for a descriptor's nearest word only) when its
# list holds more than a share of the images AND more than this many entries: shorter lists cost
# nothing to scan, and in small databases word statistics are too few to tell generic words.
POPULATED_MIN_ENTRIES = 100


class IndexSource(Protocol):
    """Where the database descriptors come from, one image at a time."""

    def descriptors(self, image_id: str) -> np.ndarray: ...

    def content(self, image_id: str) -> tuple[str, str]:
        """(settings_hash, checksum) of an image's features: the checksum changes whenever they do."""

    def fingerprint(self) -> str | None:
        """Changes whenever any image's features may have changed; None if unknown (then every
        indexed image's content is read again whenever the index is opened)."""


class AsmkIndex:
    """An ASMK index directory: add images, score a query against every indexed image."""

    def __init__(self, files: IndexFiles, codebook: asmk.Codebook, next_segment: int,
                 source_fingerprint: str | None = None) -> None:
        self.files = files
        self.directory = files.directory
        self.codebook = codebook
        # The source's fingerprint when every indexed image's content was last checked against it.
        self.source_fingerprint = source_fingerprint
        self._kernel = asmk.kernel_of_hamming(codebook.dim)
        self._next_segment = next_segment
        self.stop_word_share: float | None = None  # what the stop list was decided with (None: no stop list)
        self.stop_words = np.zeros(0, dtype=np.int64)  # sorted word ids left out of searches
        self._stop_words_changed = False
        self._forget_segments()

    @property
    def code_width(self) -> int:
        return (self.codebook.dim + 7) // 8

    def _forget_segments(self) -> None:
        self.segments: list[segments.Segment] = []
        self.image_ids: list[str] = []  # by image number; a removed image's id may come again later
        self.settings_hashes: list[str] = []
        self.checksums: list[str] = []
        self.number_of: dict[str, int] = {}  # id -> number of its live entry
        self.removed: set[int] = set()  # numbers of images indexed again or dropped, until the next merge
        self.words_per_image = np.zeros(0, dtype=np.int64)
        self.word_counts = np.zeros(self.codebook.size, dtype=np.int64)  # entries (= images) per word

    def _append(self, segment: segments.Segment) -> None:
        append_numbered(self, segment)
        self.settings_hashes.extend(segment.settings_hashes)
        self.words_per_image = np.concatenate([self.words_per_image, segment.words.astype(np.int64)])
        self.word_counts += np.diff(segment.offsets)

    def _set_removed(self, removed: Iterable[int]) -> None:
        self.removed = set(removed)
        for number in sorted(self.removed):  # an id's live number is its last one not removed
            if self.number_of.get(self.image_ids[number]) == number:
                del self.number_of[self.image_ids[number]]

    # -- opening, creating ------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike, codebook: asmk.Codebook) -> AsmkIndex:
        """A new, empty index with this codebook (replaces any index in `directory`)."""
        files = IndexFiles(directory, WHAT, FORMAT)
        with locked(files.directory):
            files.clear((STOP_WORDS_FILE, "codebook.npy", "cells.npy"))
            files.write_array("codebook.npy", codebook.centroids)
            if codebook.cells is not None:
                files.write_array("cells.npy", codebook.cells)
            index = cls(files, codebook, 0)
            index._commit()
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike) -> AsmkIndex | None:
        """The index in `directory`, or None if there is none. DamagedIndexError (one line) when a
        file is missing, damaged or inconsistent; OutdatedIndexError for an older format."""
        files = IndexFiles(directory, WHAT, FORMAT)
        if files.directory.exists() and not files.directory.is_dir():
            raise InputError(f"{WHAT} folder {files.directory} is a file, not a folder")
        meta = files.read_manifest(OLDER_FORMATS)
        if meta is None:
            return None
        try:
            dim, size, two_level = int(meta["dim"]), int(meta["codebook_size"]), bool(meta["two_level"])
            segment_names, next_segment = string_list(meta["segments"]), int(meta["next_segment"])
            removed = [int(number) for number in meta["removed"]]
            fingerprint = meta["source_fingerprint"]
            stop_word_share = meta["stop_word_share"]
            if stop_word_share is not None:
                stop_word_share = float(stop_word_share)
            if not all(segments.NAME.fullmatch(name) for name in segment_names) or \
                    not isinstance(fingerprint, str | None):
                raise ValueError("bad segment names or fingerprint")
        except (KeyError, TypeError, ValueError) as error:
            raise files.damaged(f"{MANIFEST_FILE} has a bad entry ({error})") from None
        checked = files.verify()
        centroids = files.load_array("codebook.npy", np.float32, 2)
        cells = files.load_array("cells.npy", np.float32, 2) if two_level else None
        if centroids.shape != (size, dim) or (cells is not None and cells.shape[1] != dim):
            raise files.damaged(f"the codebook has shape {centroids.shape}, expected ({size}, {dim})")
        if not np.isfinite(centroids).all() or (cells is not None and not np.isfinite(cells).all()):
            raise files.damaged("the codebook holds NaN or infinity")
        index = cls(files, asmk.Codebook(centroids, cells), next_segment, fingerprint)
        for name in segment_names:
            deep = any(file.startswith(name) for file in checked)  # just verified in full: check its numbers too
            index._append(segments.read_segment(files, name, size, index.code_width, deep))
        if meta.get("num_images") != len(index.image_ids) or any(not 0 <= n < len(index.image_ids) for n in removed):
            raise files.damaged(f"{MANIFEST_FILE} counts {meta.get('num_images')} images, the segments hold "
                                f"{len(index.image_ids)}")
        index._set_removed(removed)
        if stop_word_share is not None:
            stop_words = files.load_array(STOP_WORDS_FILE, np.int64, 1)
            if len(stop_words) and (stop_words[0] < 0 or stop_words[-1] >= size or (np.diff(stop_words) <= 0).any()):
                raise files.damaged(f"{STOP_WORDS_FILE} is not a sorted list of word ids")
            index.stop_word_share, index.stop_words = stop_word_share, stop_words
        return index

    def _commit(self) -> None:
        """Write index.json (the commit point), then delete files it does not list."""
        meta = {
            "dim": self.codebook.dim, "codebook_size": self.codebook.size,
            "two_level": self.codebook.cells is not None, "num_images": len(self.image_ids),
            "segments": [segment.name for segment in self.segments], "next_segment": self._next_segment,
            "removed": sorted(self.removed), "source_fingerprint": self.source_fingerprint,
            "stop_word_share": self.stop_word_share,
        }
        names = ["codebook.npy", *(["cells.npy"] if self.codebook.cells is not None else [])]
        if self.stop_word_share is not None:
            if STOP_WORDS_FILE not in self.files.records or self._stop_words_changed:
                self.files.write_array(STOP_WORDS_FILE, self.stop_words)
            names.append(STOP_WORDS_FILE)
        self._stop_words_changed = False
        names += [f"{segment.name}.{suffix}" for segment in self.segments for suffix in segments.FILES]
        self.files.commit(meta, names)
        for path in self.directory.glob("segment-*"):
            if path.name not in names:
                path.unlink(missing_ok=True)
        # Writers hold the directory lock, so temporaries present now were left by killed ones.
        self.files.remove_temporaries()

    def record_fingerprint(self, fingerprint: str | None) -> None:
        """Remember that every indexed image was checked against the source in this state; skipped
        on read-only storage (the next open checks again, which costs time, not correctness)."""
        if fingerprint == self.source_fingerprint:
            return
        if not os.access(self.directory, os.W_OK):
            LOGGER.info("%s %s is read-only: its images' feature checksums will be compared with the store "
                        "again next time", WHAT, self.directory)
            return
        self.source_fingerprint = fingerprint
        with locked(self.directory):
            self._commit()

    # -- adding, removing -------------------------------------------------------------------

    def add(self, source: IndexSource, image_ids: Iterable[str], *, progress: bool = False) -> None:
        """Append images (not yet indexed), streaming their descriptors one image at a time; a
        segment is committed whenever SEGMENT_ENTRIES entries are buffered, so an interrupted
        add keeps what was committed and a later add resumes with the rest."""
        with locked(self.directory):
            self._add(source, image_ids, progress)

    def _add(self, source: IndexSource, image_ids: Iterable[str], progress: bool) -> None:
        pending = [i for i in dict.fromkeys(image_ids) if i not in self.number_of]
        buffer: dict[str, list] = {"words": [], "codes": [], "counts": [], "ids": [], "hashes": [], "checksums": []}
        buffered = 0
        bar = tqdm(total=len(pending), desc="ASMK index: add images", unit="image", disable=not progress)
        for first in range(0, len(pending), ADD_BATCH):
            batch = pending[first : first + ADD_BATCH]
            # The checksum is read before the descriptors: if the image changes in between, the
            # recorded checksum is the older one and the next open indexes the image again.
            contents = [source.content(image_id) for image_id in batch]
            descriptors = [self._checked_descriptors(source, image_id) for image_id in batch]
            for image_id, (settings_hash, checksum), (words, codes) in zip(
                    batch, contents, self._words_of_images(descriptors), strict=True):
                for key, value in zip(buffer, (words, codes, len(words), image_id, settings_hash, checksum),
                                      strict=True):
                    buffer[key].append(value)
                buffered += len(words)
                if buffered >= SEGMENT_ENTRIES:
                    self._flush(buffer)
                    buffered = 0
            bar.update(len(batch))
        bar.close()
        if buffer["ids"]:
            self._flush(buffer)

    def _checked_descriptors(self, source: IndexSource, image_id: str) -> np.ndarray:
        descriptors = np.asarray(source.descriptors(image_id), dtype=np.float32)
        if len(descriptors) and (descriptors.ndim != 2 or descriptors.shape[1] != self.codebook.dim):
            raise InputError(f"descriptors of {image_id!r} have shape {descriptors.shape}, but the ASMK index "
                             f"in {self.directory} holds {self.codebook.dim}-D descriptors")
        return descriptors.reshape(-1, self.codebook.dim)

    def _words_of_images(self, descriptors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(words, codes) of each image (asmk.image_words), with one word assignment for all of them:
        faiss then shares the work between the cores."""
        counts = [len(d) for d in descriptors]
        assigned = self.codebook.assign(np.concatenate(descriptors), 1, asmk.DATABASE_PROBES)
        bounds = np.cumsum([0, *counts])
        result = []
        for image, image_descriptors in enumerate(descriptors):
            words, residuals = asmk.aggregate_residuals(image_descriptors, assigned[bounds[image] : bounds[image + 1]],
                                                        self.codebook.centroids)
            result.append((words, asmk.binarize(residuals)))
        return result

    def _flush(self, buffer: dict[str, list]) -> None:
        """Write the buffered images as a new segment and commit it."""
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        segments.write_segment(self.files, name, len(self.image_ids), self.codebook.size, self.code_width, buffer)
        self._append(segments.read_segment(self.files, name, self.codebook.size, self.code_width, deep=False))
        self._commit()
        for values in buffer.values():
            values.clear()

    def remove(self, image_ids: Iterable[str]) -> None:
        """Drop images from the index (their entries stay on disk, unused, until the next merge);
        adding one of them again indexes its current features."""
        with locked(self.directory):
            numbers = [self.number_of[image_id] for image_id in image_ids if image_id in self.number_of]
            if numbers:
                self._set_removed(self.removed | set(numbers))
                self._commit()

    # -- merging ----------------------------------------------------------------------------

    def merge(self) -> None:
        """Rewrite all segments as one without the removed images (streamed)."""
        if len(self.segments) < 2 and not self.removed:
            return
        with locked(self.directory):
            self._merge()

    def _merge(self) -> None:
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        live = np.ones(len(self.image_ids), dtype=bool)
        live[sorted(self.removed)] = False
        segments.write_merged_segment(self.files, name, self.segments, live, self.code_width, {
            "image_ids": self.image_ids, "settings_hashes": self.settings_hashes, "checksums": self.checksums,
            "words_per_image": self.words_per_image})
        self._forget_segments()
        self._append(segments.read_segment(self.files, name, self.codebook.size, self.code_width, deep=False))
        if self.stop_word_share is not None:
            self._decide_stop_words(self.stop_word_share)
        self._commit()

    # -- frequent words -----------------------------------------------------------------------

    @property
    def num_live_images(self) -> int:
        return len(self.image_ids) - len(self.removed)

    def populated_words(self, share: float) -> np.ndarray:
        """(W,) bool: words whose lists hold more than `share` of the images (and more than
        POPULATED_MIN_ENTRIES entries)."""
        return self.word_counts > max(share * self.num_live_images, POPULATED_MIN_ENTRIES)

    def set_stop_words(self, share: float) -> None:
        """Decide the stop list from the index's word statistics: the populated words at `share`
        (1 = none), and record it (kept in memory on read-only storage). Merges decide it again
        with the same share."""
        if share == self.stop_word_share:
            return
        self._decide_stop_words(share)
        if not os.access(self.directory, os.W_OK):
            LOGGER.info("%s %s is read-only: its stop list for share %g is used without being recorded", WHAT,
                        self.directory, share)
            return
        with locked(self.directory):
            self._commit()

    def _decide_stop_words(self, share: float) -> None:
        stop_words = np.flatnonzero(self.populated_words(share)).astype(np.int64)
        self._stop_words_changed = self.stop_word_share is None or not np.array_equal(stop_words, self.stop_words)
        self.stop_word_share, self.stop_words = share, stop_words
        if len(stop_words):
            LOGGER.info("%s %s: %d stop words (lists of more than %g of the images) hold %.1f %% of the entries",
                        WHAT, self.directory, len(stop_words), share,
                        100 * self.word_counts[stop_words].sum() / max(1, self.word_counts.sum()))

    def query_words(self, descriptors: np.ndarray, assignments: int = asmk.QUERY_ASSIGNMENTS,
                    assignment_share: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(words, codes) of a query: each descriptor assigned to its `assignments` nearest words,
        except stop words and, beyond its nearest word, the populated words at `assignment_share`;
        residuals summed per word and binarised."""
        assigned = self.codebook.assign(descriptors, assignments, asmk.QUERY_PROBES)
        dropped = np.isin(assigned, self.stop_words) if len(self.stop_words) else np.zeros(assigned.shape, bool)
        if assignment_share < 1.0 and assigned.shape[1] > 1:
            dropped[:, 1:] |= self.populated_words(assignment_share)[np.maximum(assigned[:, 1:], 0)]
        assigned = np.where(dropped, -1, assigned)
        words, residuals = asmk.aggregate_residuals(descriptors, assigned, self.codebook.centroids)
        return words, asmk.binarize(residuals)

    # -- searching --------------------------------------------------------------------------

    def scores(self, descriptors: np.ndarray, assignments: int = asmk.QUERY_ASSIGNMENTS, *,
               assignment_share: float = 1.0, threads: int = 1) -> np.ndarray:
        """(number of image numbers,) ASMK similarity of a query (its descriptors) to each indexed
        image (0 for removed ones), searching the words of `query_words`; `threads` scan the lists.

        Each image's self-similarity counts all its words, stop words too: an image without a
        word left out of the search scores as without the stop list."""
        descriptors = np.asarray(descriptors, dtype=np.float32)
        scores = np.zeros(len(self.image_ids), dtype=np.float64)
        if len(descriptors) and (descriptors.ndim != 2 or descriptors.shape[1] != self.codebook.dim):
            raise InputError(f"query descriptors are {descriptors.shape[-1]}-D but the ASMK index in "
                             f"{self.directory} holds {self.codebook.dim}-D descriptors "
                             "(features from different extraction settings?)")
        if not len(descriptors) or not len(scores):
            return scores
        return self.scores_of_words(*self.query_words(descriptors, assignments, assignment_share), threads=threads)

    def scores_of_words(self, words: np.ndarray, codes: np.ndarray, threads: int = 1) -> np.ndarray:
        """The scores of a query's `query_words`: its lists scanned (scan.scan_lists), normalised."""
        scores = np.zeros(len(self.image_ids), dtype=np.float64)
        if not len(words) or not len(scores):
            return scores
        for segment in self.segments:
            scan_lists(segment.offsets, segment.images, segment.codes, words, codes, self._kernel, scores, threads)
        # Normalise by both self-similarities (number of words: each word's binary self-match is 1).
        with np.errstate(divide="ignore", invalid="ignore"):
            scores /= np.sqrt(self.words_per_image * len(words))
        scores[sorted(self.removed)] = 0.0
        return np.nan_to_num(scores, nan=0.0, posinf=0.0)

    def num_bytes(self) -> int:
        """Size of the index files on disk."""
        return self.files.num_bytes()


def locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """One writer of the ASMK index in `directory` at a time (index_files.locked)."""
    return index_files.locked(directory, WHAT)


def image_numbers(index: AsmkIndex, image_ids: Sequence[str]) -> np.ndarray:
    """The live image numbers of `image_ids` (all indexed)."""
    return np.array([index.number_of[image_id] for image_id in image_ids], dtype=np.int64)
