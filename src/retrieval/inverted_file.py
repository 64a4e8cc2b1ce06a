"""The ASMK index on disk: codebook + inverted file over words, checked, memory-mapped.

Layout of an index directory (by default `<index store>.asmk` beside the feature store), every
file written and checked through `index_files.IndexFiles`:

- `index.json`: the manifest and commit point (written atomically last, so an interrupted build
  or add leaves the previous index): descriptor size, codebook size, the segments, the image
  numbers removed since the last merge, and every file's size and CRC-32;
- `codebook.npy` (W, D) float32 centroids, `cells.npy` (C, D) for a two-level codebook;
- per segment (the images of one build or add step, numbered consecutively):
  `<segment>.offsets.npy` (W + 1) int64: entries of word w are rows offsets[w]:offsets[w + 1];
  `<segment>.images.npy` (E) uint32 image number of each entry, ascending within a word;
  `<segment>.codes.npy` (E, ceil(D / 8)) uint8 binarised residual of each entry;
  `<segment>.words.npy` (images) uint32 number of words (= entries) of each image;
  `<segment>.images.json` each image's id, feature settings_hash and feature checksum (the
  feature store's per-image CRC-32: an image whose features changed is indexed again).

Every .npy is read with allow_pickle=False; entries and codes are memory-mapped, so a query
touches only the lists of its words. Per indexed image the files hold 4 + ceil(D / 8) bytes per
distinct word (about 9 KB for 1000 40-D descriptors) and a few bytes of bookkeeping.

Opening checks every file's size, shape and dtype, the segments' consistency (offsets ascending
from 0 to the number of entries, entries per image adding up to it, one listing per image) and,
once per file identity, every file's CRC-32 and the image numbers' range (IndexFiles.verify).

Adding streams image by image and never holds all descriptors: one image plus at most
SEGMENT_ENTRIES buffered entries (0.4 GB measured at D = 40 including the sort); a segment is
written whenever the buffer fills. Segments are merged into one after a build and when more
than MAX_SEGMENTS accumulate, streaming MERGE_CHUNK entries at a time in word order (plain writes
after a check for room: a full disk is one line, never a SIGBUS from a mapped file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from src.retrieval import asmk, index_files
from src.retrieval.index_files import MANIFEST_FILE, VERIFIED_FILE, IndexFiles, string_list

LOGGER = logging.getLogger("delf.retrieval")

FORMAT = "delf-asmk-index-v2"  # v2: checksums, per-image feature checksums, removed images
OLDER_FORMATS = ("delf-asmk-index-v1",)
WHAT = "ASMK index"
SEGMENT_ENTRIES = 1 << 23  # ~8,500 images of 1000 features; ~140 MB buffered at D = 40
MAX_SEGMENTS = 8
MERGE_CHUNK = 1 << 22
_SEGMENT_FILES = ("offsets.npy", "images.npy", "codes.npy", "words.npy", "images.json")
_SEGMENT_NAME = re.compile(r"segment-\d{6}")


class IndexSource(Protocol):
    """Where the database descriptors come from, one image at a time."""

    def descriptors(self, image_id: str) -> np.ndarray: ...

    def content(self, image_id: str) -> tuple[str, str]:
        """(settings_hash, checksum) of an image's features: the checksum changes whenever they do."""

    def fingerprint(self) -> str | None:
        """Changes whenever any image's features may have changed; None if unknown (then every
        indexed image's content is read again whenever the index is opened)."""


@dataclass
class _Segment:
    name: str
    first_image: int
    offsets: np.ndarray  # (W + 1,) int64, in memory
    images: np.ndarray  # (E,) uint32, memory-mapped
    codes: np.ndarray  # (E, B) uint8, memory-mapped
    words: np.ndarray  # (num_images,) uint32
    image_ids: list[str]
    settings_hashes: list[str]
    checksums: list[str]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_entries(self) -> int:
        return int(self.offsets[-1])


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
        self._forget_segments()

    @property
    def code_width(self) -> int:
        return (self.codebook.dim + 7) // 8

    def _forget_segments(self) -> None:
        self.segments: list[_Segment] = []
        self.image_ids: list[str] = []  # by image number; a removed image's id may come again later
        self.settings_hashes: list[str] = []
        self.checksums: list[str] = []
        self.number_of: dict[str, int] = {}  # id -> number of its live entry
        self.removed: set[int] = set()  # numbers of images indexed again or dropped, until the next merge
        self.words_per_image = np.zeros(0, dtype=np.int64)

    def _append(self, segment: _Segment) -> None:
        if segment.first_image != len(self.image_ids):
            raise self.files.damaged(f"{segment.name} starts at image {segment.first_image}, "
                                     f"expected {len(self.image_ids)}")
        self.segments.append(segment)
        self.number_of.update((image_id, segment.first_image + k) for k, image_id in enumerate(segment.image_ids))
        self.image_ids.extend(segment.image_ids)
        self.settings_hashes.extend(segment.settings_hashes)
        self.checksums.extend(segment.checksums)
        self.words_per_image = np.concatenate([self.words_per_image, segment.words.astype(np.int64)])

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
            _clear(files.directory)
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
            segments, next_segment = string_list(meta["segments"]), int(meta["next_segment"])
            removed = [int(number) for number in meta["removed"]]
            fingerprint = meta["source_fingerprint"]
            if not all(_SEGMENT_NAME.fullmatch(name) for name in segments) or not isinstance(fingerprint, str | None):
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
        for name in segments:
            index._append(index._read_segment(name, deep=any(f.startswith(name) for f in checked)))
        if meta.get("num_images") != len(index.image_ids) or any(not 0 <= n < len(index.image_ids) for n in removed):
            raise files.damaged(f"{MANIFEST_FILE} counts {meta.get('num_images')} images, the segments hold "
                                f"{len(index.image_ids)}")
        index._set_removed(removed)
        return index

    def _read_segment(self, name: str, deep: bool) -> _Segment:
        """One segment's files, their shapes and consistency checked (and the image numbers'
        range when `deep`: the files were just verified in full)."""
        files = self.files
        listing = files.load_json(f"{name}.images.json")
        try:
            first_image = listing["first_image"]
            if not isinstance(first_image, int):
                raise ValueError("first_image is not a number")
            image_ids = string_list(listing["image_ids"])
            settings_hashes = string_list(listing["settings_hashes"], len(image_ids))
            checksums = string_list(listing["checksums"], len(image_ids))
        except (KeyError, TypeError, ValueError) as error:
            raise files.damaged(f"{name}.images.json has a bad entry ({error})") from None
        offsets = files.load_array(f"{name}.offsets.npy", np.int64, 1)
        images = files.load_array(f"{name}.images.npy", np.uint32, 1, mmap=True)
        codes = files.load_array(f"{name}.codes.npy", np.uint8, 2, mmap=True)
        words = files.load_array(f"{name}.words.npy", np.uint32, 1)
        problem = None
        if len(offsets) != self.codebook.size + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            problem = f"{name}.offsets.npy is not {self.codebook.size + 1} ascending offsets from 0"
        elif not offsets[-1] == len(images) == len(codes) == int(words.sum(dtype=np.int64)):
            problem = (f"{name} has {offsets[-1]} entries by its offsets, {len(images)} image numbers, "
                       f"{len(codes)} codes and {int(words.sum(dtype=np.int64))} by its words per image")
        elif codes.shape[1] != self.code_width or len(words) != len(image_ids):
            problem = f"{name} has codes of {codes.shape[1]} bytes and {len(words)} words per image for " \
                      f"{len(image_ids)} images"
        elif deep and len(images) and (images.min() < first_image or images.max() >= first_image + len(image_ids)):
            problem = f"{name}.images.npy has image numbers outside {first_image}..{first_image + len(image_ids) - 1}"
        if problem:
            raise files.damaged(problem)
        return _Segment(name, first_image, offsets, images, codes, words, image_ids, settings_hashes, checksums)

    def _commit(self) -> None:
        """Write index.json (the commit point), then delete files it does not list."""
        meta = {
            "dim": self.codebook.dim, "codebook_size": self.codebook.size,
            "two_level": self.codebook.cells is not None, "num_images": len(self.image_ids),
            "segments": [segment.name for segment in self.segments], "next_segment": self._next_segment,
            "removed": sorted(self.removed), "source_fingerprint": self.source_fingerprint,
        }
        names = ["codebook.npy", *(["cells.npy"] if self.codebook.cells is not None else [])]
        names += [f"{segment.name}.{suffix}" for segment in self.segments for suffix in _SEGMENT_FILES]
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
        for image_id in tqdm(pending, desc="ASMK index: add images", unit="image", disable=not progress):
            # The checksum is read before the descriptors: if the image changes in between, the
            # recorded checksum is the older one and the next open indexes the image again.
            settings_hash, checksum = source.content(image_id)
            descriptors = np.asarray(source.descriptors(image_id))
            if len(descriptors) and (descriptors.ndim != 2 or descriptors.shape[1] != self.codebook.dim):
                raise InputError(f"descriptors of {image_id!r} have shape {descriptors.shape}, but the ASMK index "
                                 f"in {self.directory} holds {self.codebook.dim}-D descriptors")
            words, codes = asmk.image_words(descriptors, self.codebook, 1, asmk.DATABASE_PROBES)
            for key, value in zip(buffer, (words, codes, len(words), image_id, settings_hash, checksum), strict=True):
                buffer[key].append(value)
            buffered += len(words)
            if buffered >= SEGMENT_ENTRIES:
                self._flush(buffer)
                buffered = 0
        if buffer["ids"]:
            self._flush(buffer)

    def _flush(self, buffer: dict[str, list]) -> None:
        """Write the buffered images as a new segment (entries grouped by word) and commit it."""
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        first_image = len(self.image_ids)
        counts = np.asarray(buffer["counts"], dtype=np.int64)
        words = np.concatenate(buffer["words"]) if buffer["words"] else np.zeros(0, np.int64)
        codes = np.concatenate(buffer["codes"]) if buffer["codes"] else np.zeros((0, self.code_width), np.uint8)
        images = np.repeat(np.arange(first_image, first_image + len(counts), dtype=np.uint32), counts)
        order = np.argsort(words, kind="stable")  # stable: image numbers stay ascending within a word
        files = self.files
        files.write_array(f"{name}.offsets.npy",
                          np.concatenate([[0], np.cumsum(np.bincount(words, minlength=self.codebook.size))]))
        files.write_array(f"{name}.images.npy", images[order])
        files.write_array(f"{name}.codes.npy", codes[order])
        files.write_array(f"{name}.words.npy", counts.astype(np.uint32))
        files.write_json(f"{name}.images.json", {"first_image": first_image, "image_ids": buffer["ids"],
                                                 "settings_hashes": buffer["hashes"], "checksums": buffer["checksums"]})
        self._append(self._read_segment(name, deep=False))
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
        """Rewrite all segments as one without the removed images, streaming MERGE_CHUNK entries
        at a time in word order."""
        if len(self.segments) < 2 and not self.removed:
            return
        with locked(self.directory):
            self._merge()

    def _merge(self) -> None:
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        live = np.ones(len(self.image_ids), dtype=bool)
        live[sorted(self.removed)] = False
        new_number = (np.cumsum(live) - 1).astype(np.uint32)
        counts = sum(np.diff(segment.offsets) for segment in self.segments)  # per word, removed included
        total = int(counts.sum()) - int(self.words_per_image[~live].sum())
        kept_ids = [image_id for image_id, keep in zip(self.image_ids, live, strict=True) if keep]
        # Entries, offsets, words per image, and the image listing (ids and two hashes, ~100 bytes).
        self.files.require_room(total * (4 + self.code_width) + 8 * len(counts) + 200 * len(kept_ids) + 2**16,
                                "merging its segments")
        kept_counts = np.zeros(len(counts), dtype=np.int64)
        with self.files.array_writer(f"{name}.images.npy", np.uint32, (total,)) as images_out, \
                self.files.array_writer(f"{name}.codes.npy", np.uint8, (total, self.code_width)) as codes_out:
            for first, last, images, codes, chunk_counts in self._entries_in_word_order(counts):
                keep = live[images]
                if keep.all():
                    kept_counts[first:last] += chunk_counts
                else:
                    words = np.repeat(np.arange(last - first), chunk_counts)[keep]
                    kept_counts[first:last] += np.bincount(words, minlength=last - first)
                    images, codes = images[keep], codes[keep]
                images_out.write(new_number[images])
                codes_out.write(codes)
        self.files.write_array(f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(kept_counts)]))
        self.files.write_array(f"{name}.words.npy", self.words_per_image[live].astype(np.uint32))
        self.files.write_json(f"{name}.images.json", {
            "first_image": 0, "image_ids": kept_ids,
            "settings_hashes": [h for h, keep in zip(self.settings_hashes, live, strict=True) if keep],
            "checksums": [c for c, keep in zip(self.checksums, live, strict=True) if keep]})
        self._forget_segments()
        self._append(self._read_segment(name, deep=False))
        self._commit()

    def _entries_in_word_order(self, counts: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, ...]]:
        """(first word, last word + 1, image numbers, codes, entries per word) of all segments'
        entries, in chunks of about MERGE_CHUNK entries covering consecutive words; within a word,
        segments in order."""
        bounds = np.concatenate([[0], np.cumsum(counts)])
        first = 0
        while first < len(counts):
            last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + MERGE_CHUNK, side="right")) - 1)
            last = min(last, len(counts))
            chunk_counts = counts[first:last]
            size = int(chunk_counts.sum())
            images = np.empty(size, dtype=np.uint32)
            codes = np.empty((size, self.code_width), dtype=np.uint8)
            written = np.concatenate([[0], np.cumsum(chunk_counts)[:-1]])  # next free row of each word
            for segment in self.segments:  # in image order, so lists stay sorted by image
                begin, end = int(segment.offsets[first]), int(segment.offsets[last])
                segment_counts = np.diff(segment.offsets[first : last + 1])
                destination = np.repeat(written - (segment.offsets[first:last] - begin), segment_counts) + \
                    np.arange(end - begin)
                images[destination] = segment.images[begin:end]
                codes[destination] = segment.codes[begin:end]
                written += segment_counts
            yield first, last, images, codes, chunk_counts
            first = last

    # -- searching --------------------------------------------------------------------------

    def scores(self, descriptors: np.ndarray, assignments: int = asmk.QUERY_ASSIGNMENTS) -> np.ndarray:
        """(number of image numbers,) ASMK similarity of a query (its descriptors) to each indexed
        image (0 for removed ones)."""
        descriptors = np.asarray(descriptors, dtype=np.float32)
        scores = np.zeros(len(self.image_ids), dtype=np.float64)
        if len(descriptors) and (descriptors.ndim != 2 or descriptors.shape[1] != self.codebook.dim):
            raise InputError(f"query descriptors are {descriptors.shape[-1]}-D but the ASMK index in "
                             f"{self.directory} holds {self.codebook.dim}-D descriptors "
                             "(features from different extraction settings?)")
        words, codes = asmk.image_words(descriptors, self.codebook, assignments, asmk.QUERY_PROBES)
        if not len(words) or not len(scores):
            return scores
        for segment in self.segments:
            starts, stops = segment.offsets[words], segment.offsets[words + 1]
            lengths = stops - starts
            total = int(lengths.sum())
            if not total:
                continue
            # Rows of all the query's word lists, list after list.
            rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
            # np.take gathers rows of the mapped arrays about twice as fast as fancy indexing.
            hamming = asmk.hamming_distances(np.take(segment.codes, rows, axis=0), np.repeat(codes, lengths, axis=0))
            scores += np.bincount(np.take(segment.images, rows), weights=self._kernel[hamming], minlength=len(scores))
        # Normalise by both self-similarities (number of words: each word's binary self-match is 1).
        with np.errstate(divide="ignore", invalid="ignore"):
            scores /= np.sqrt(self.words_per_image * len(words))
        scores[sorted(self.removed)] = 0.0
        return np.nan_to_num(scores, nan=0.0, posinf=0.0)

    def num_bytes(self) -> int:
        """Size of the index files on disk."""
        return self.files.num_bytes() + (self.directory / MANIFEST_FILE).stat().st_size


def locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """One writer of the ASMK index in `directory` at a time (index_files.locked)."""
    return index_files.locked(directory, WHAT)


def _clear(directory: Path) -> None:
    """Remove an index's files from its directory (nothing else)."""
    for path in directory.iterdir():
        ours = path.name in (MANIFEST_FILE, VERIFIED_FILE, "codebook.npy", "cells.npy") or \
            path.name.startswith("segment-")
        if ours or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink()


def image_numbers(index: AsmkIndex, image_ids: Sequence[str]) -> np.ndarray:
    """The live image numbers of `image_ids` (all indexed)."""
    return np.array([index.number_of[image_id] for image_id in image_ids], dtype=np.int64)
