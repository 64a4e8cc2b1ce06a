"""The global-descriptor index of a database (DELG): every image's global descriptor in files beside
the feature store, memory-mapped, scored by exact inner products.

Layout of an index directory (by default `<index store>.global` beside the feature store), written
and read through `index_files.IndexFiles` (a manifest listing every file's size and CRC-32, checked
on open; any mismatch is one line saying which directory to delete to rebuild):

- `index.json`: format, dimension, number of images, segments, and the fingerprint of the store
  when every indexed image's checksum was last compared with it (the commit point, written last);
- per segment (the images of one build or add step, at most SEGMENT_IMAGES):
  `<segment>.descriptors.npy` (n, D) float32, memory-mapped;
  `<segment>.images.json`: the image ids and each image's feature checksum (the store's per-image
  CRC-32, which covers its global descriptor).

Per image the index holds 4 D bytes (8,192 at D = 2048) plus its id and checksum in JSON (~40 bytes).

`open_or_build_global_index` keeps an index in step with its store: built on first use, completed
when images are added (a new segment; segments are merged when more than MAX_SEGMENTS beyond the
full ones accumulate), and rebuilt when an indexed image's features changed (its checksum differs).
The checksums are read only when the store's fingerprint differs from the recorded one.

Scores are exact: one BLAS matrix product of a batch of queries with the mapped descriptors
(faiss's own exact inner-product search computes the same product); `search` returns the top k
through faiss.knn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from src.retrieval import index_files
from src.retrieval.faiss_setup import faiss
from src.retrieval.index_files import (
    MANIFEST_FILE,
    IndexFiles,
    append_numbered,
    open_to_update,
    read_image_listing,
    string_list,
)

LOGGER = logging.getLogger("delf.retrieval")

WHAT = "global-descriptor index"
FORMAT = "delg-global-index-v1"
INDEX_SUFFIX = ".global"
SEGMENT_IMAGES = 1 << 16  # 512 MB of descriptors at D = 2048: a build commits this many images at a time
MAX_SEGMENTS = 8  # small segments (from adds) tolerated before they are merged
SCORE_BLOCK_ROWS = 1 << 14  # database rows per matrix product: bounds the temporary of a product
_SEGMENT_NAME = re.compile(r"segment-\d{6}")
_SEGMENT_FILES = ("descriptors.npy", "images.json")


class GlobalSource(Protocol):
    """Where the database's global descriptors come from, one image at a time."""

    def global_descriptor(self, image_id: str) -> np.ndarray: ...

    def checksum(self, image_id: str) -> str:
        """Changes whenever the image's global descriptor may have changed."""

    def fingerprint(self) -> str | None:
        """Changes whenever any image may have changed; None if unknown (then every indexed image's
        checksum is compared whenever the index is opened)."""


class StoreGlobalSource:
    """A feature store (or a shard set read as one) as a GlobalSource."""

    def __init__(self, store) -> None:
        self.store = store

    def global_descriptor(self, image_id: str) -> np.ndarray:
        return self.store.global_descriptor(image_id)

    def checksum(self, image_id: str) -> str:
        return str(self.store.content(image_id)[1])  # 'None' for pre-checksum images: they have no global

    def fingerprint(self) -> str:
        return self.store.state()


def index_path_for(store_path: str | os.PathLike) -> Path:
    """The default index directory of a feature store: `<store path>.global`."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + INDEX_SUFFIX)


@dataclass
class _Segment:
    name: str
    first_image: int
    descriptors: np.ndarray  # (n, D) float32, memory-mapped
    image_ids: list[str]
    checksums: list[str]


class GlobalIndex:
    """A global-descriptor index directory: add images, score queries against every indexed image."""

    def __init__(self, files: IndexFiles, dim: int, next_segment: int = 0, source_fingerprint: str | None = None
                 ) -> None:
        self.files = files
        self.directory = files.directory
        self.dim = dim  # 0 until the first image is added
        self.source_fingerprint = source_fingerprint
        self._next_segment = next_segment
        self.segments: list[_Segment] = []
        self.image_ids: list[str] = []
        self.checksums: list[str] = []
        self.number_of: dict[str, int] = {}

    # -- opening, creating ------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike) -> GlobalIndex:
        """A new, empty index (replaces any index in `directory`)."""
        files = IndexFiles(directory, WHAT, FORMAT)
        with locked(files.directory):
            files.clear()
            index = cls(files, 0)
            index._commit()
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike) -> GlobalIndex | None:
        """The index in `directory`, or None if there is none. DamagedIndexError (one line) when a
        file is missing, damaged or inconsistent; OutdatedIndexError for another format."""
        files = IndexFiles(directory, WHAT, FORMAT)
        if files.directory.exists() and not files.directory.is_dir():
            raise InputError(f"{WHAT} folder {files.directory} is a file, not a folder")
        meta = files.read_manifest()
        if meta is None:
            return None
        try:
            dim, num_images, next_segment = int(meta["dim"]), int(meta["num_images"]), int(meta["next_segment"])
            segments, fingerprint = string_list(meta["segments"]), meta["source_fingerprint"]
            if not all(_SEGMENT_NAME.fullmatch(name) for name in segments) or not isinstance(fingerprint, str | None):
                raise ValueError("bad segment names or fingerprint")
        except (KeyError, TypeError, ValueError) as error:
            raise files.damaged(f"{MANIFEST_FILE} has a bad entry ({error})") from None
        checked = files.verify()
        index = cls(files, dim, next_segment, fingerprint)
        for name in segments:
            append_numbered(index, index._read_segment(name, deep=f"{name}.descriptors.npy" in checked))
        if num_images != len(index.image_ids):
            raise files.damaged(f"{MANIFEST_FILE} counts {num_images} images, the segments hold {len(index.image_ids)}")
        return index

    def _read_segment(self, name: str, deep: bool) -> _Segment:
        """One segment's files, shapes checked (and finite values when `deep`: the file was just
        verified in full, so this costs no extra read from disk)."""
        first_image, image_ids, checksums = read_image_listing(self.files, name, "checksums")
        descriptors = self.files.load_array(f"{name}.descriptors.npy", np.float32, 2, mmap=True)
        if descriptors.shape != (len(image_ids), self.dim):
            raise self.files.damaged(f"{name}.descriptors.npy has shape {descriptors.shape}, expected "
                                     f"({len(image_ids)}, {self.dim})")
        if deep and not all(np.isfinite(descriptors[start:start + SCORE_BLOCK_ROWS]).all()
                            for start in range(0, len(descriptors), SCORE_BLOCK_ROWS)):
            raise self.files.damaged(f"{name}.descriptors.npy holds NaN or infinity")
        return _Segment(name, first_image, descriptors, image_ids, checksums)

    def _commit(self) -> None:
        """Write index.json (the commit point), then delete segment files it does not list."""
        meta = {"dim": self.dim, "num_images": len(self.image_ids), "next_segment": self._next_segment,
                "segments": [segment.name for segment in self.segments],
                "source_fingerprint": self.source_fingerprint}
        names = [f"{segment.name}.{suffix}" for segment in self.segments for suffix in _SEGMENT_FILES]
        self.files.commit(meta, names)
        for path in self.directory.glob("segment-*"):
            if path.name not in names:
                path.unlink(missing_ok=True)
        self.files.remove_temporaries()  # writers hold the lock: temporaries now are a killed writer's

    def record_fingerprint(self, fingerprint: str | None) -> None:
        """Remember that every indexed image was compared with the source in this state (skipped on
        read-only storage: the next open compares again, which costs time, not correctness)."""
        if fingerprint == self.source_fingerprint:
            return
        if not os.access(self.directory, os.W_OK):
            LOGGER.info("%s %s is read-only: its checksums are compared with the store again next time",
                        WHAT, self.directory)
            return
        self.source_fingerprint = fingerprint
        with locked(self.directory):
            self._commit()

    # -- adding ----------------------------------------------------------------------------

    def add(self, source: GlobalSource, image_ids: Sequence[str], *, progress: bool = False) -> None:
        """Append the images not yet indexed, streaming one descriptor at a time; a segment is
        committed every SEGMENT_IMAGES images, so an interrupted add keeps what was committed."""
        pending = [image_id for image_id in dict.fromkeys(image_ids) if image_id not in self.number_of]
        if not pending:
            return
        with locked(self.directory):
            bar = tqdm(total=len(pending), desc=f"{WHAT}: add images", unit="image", disable=not progress)
            for start in range(0, len(pending), SEGMENT_IMAGES):
                chunk = pending[start:start + SEGMENT_IMAGES]
                if self.dim:
                    self.files.require_room(len(chunk) * (4 * self.dim + 100), f"adding {len(chunk)} images")
                # The checksum is read before the descriptor: a change in between shows as a changed
                # checksum next time, never as a stale descriptor under a current checksum.
                rows = (([source.checksum(image_id)], self._checked(image_id, source.global_descriptor(image_id)))
                        for image_id in chunk)
                append_numbered(self, self._write_segment(len(self.image_ids), chunk, rows, bar))
                self._commit()
            bar.close()

    def _checked(self, image_id: str, descriptor: np.ndarray) -> np.ndarray:
        """`descriptor` as a (1, D) float32 row; the first one added fixes D."""
        descriptor = np.asarray(descriptor, dtype=np.float32)
        if not self.dim and descriptor.ndim == 1:
            self.dim = len(descriptor)
        if descriptor.shape != (self.dim,):
            raise InputError(f"global descriptor of {image_id!r} has shape {descriptor.shape}, but the {WHAT} in "
                             f"{self.directory} holds {self.dim}-D descriptors (features of different extractions?)")
        return descriptor[None]

    def _write_segment(self, first_image: int, image_ids: list[str], blocks: Iterator[tuple[list[str], np.ndarray]],
                       bar: tqdm | None = None) -> _Segment:
        """Write a segment from (checksums, descriptor rows) blocks; returns it, not yet committed."""
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        checksums, block = next(blocks)  # the first block fixes the dimension of a new index
        checksums = list(checksums)
        with self.files.array_writer(f"{name}.descriptors.npy", np.float32, (len(image_ids), self.dim)) as writer:
            while True:
                writer.write(block)
                if bar is not None:
                    bar.update(len(block))
                try:
                    more, block = next(blocks)
                except StopIteration:
                    break
                checksums.extend(more)
        self.files.write_json(f"{name}.images.json", {"first_image": first_image, "image_ids": image_ids,
                                                      "checksums": checksums})
        return self._read_segment(name, deep=False)

    def merge(self) -> None:
        """Rewrite all segments as full ones (SEGMENT_IMAGES images each), streaming; one commit."""
        with locked(self.directory):
            total, merged = len(self.image_ids), []
            self.files.require_room(total * (4 * self.dim + 100), "merging its segments")  # the old stay until then
            for first in range(0, total, SEGMENT_IMAGES):
                stop = min(first + SEGMENT_IMAGES, total)
                starts = range(first, stop, SCORE_BLOCK_ROWS)
                bounds = [(start, min(start + SCORE_BLOCK_ROWS, stop)) for start in starts]
                blocks = ((self.checksums[start:end], self.rows(np.arange(start, end))) for start, end in bounds)
                merged.append(self._write_segment(first, self.image_ids[first:stop], blocks))
            self.segments, self.image_ids, self.checksums, self.number_of = [], [], [], {}
            for segment in merged:
                append_numbered(self, segment)
            self._commit()

    def needs_merge(self) -> bool:
        """True when there are more than MAX_SEGMENTS segments beyond the fewest that could hold the images."""
        fewest = -(-len(self.image_ids) // SEGMENT_IMAGES)
        return len(self.segments) > fewest + MAX_SEGMENTS

    # -- searching --------------------------------------------------------------------------

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or (self.dim and queries.shape[1] != self.dim):
            raise InputError(f"query global descriptors of shape {queries.shape} do not fit the {WHAT} in "
                             f"{self.directory}, which holds {self.dim}-D descriptors (features from different "
                             "extraction settings?)")
        return queries

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """(Q, indexed images) float32 inner products of each query with every indexed image."""
        queries = self._check_queries(queries)
        scores = np.empty((len(queries), len(self.image_ids)), dtype=np.float32)
        for segment in self.segments:
            for start in range(0, len(segment.image_ids), SCORE_BLOCK_ROWS):
                block = segment.descriptors[start:start + SCORE_BLOCK_ROWS]
                first = segment.first_image + start
                np.matmul(queries, block.T, out=scores[:, first:first + len(block)])
        return scores

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, image numbers), each (Q, min(k, indexed images)): every query's k best images by
        inner product, best first (faiss.knn, exact)."""
        queries = self._check_queries(queries)
        k = min(k, len(self.image_ids))
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_numbers = np.zeros((len(queries), 0), dtype=np.int64)
        for segment in self.segments:
            found_scores, found = faiss.knn(queries, segment.descriptors, min(k, len(segment.image_ids)),
                                            metric=faiss.METRIC_INNER_PRODUCT)
            best_scores = np.concatenate([best_scores, found_scores], axis=1)
            best_numbers = np.concatenate([best_numbers, found + segment.first_image], axis=1)
            order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(best_scores, order, axis=1)
            best_numbers = np.take_along_axis(best_numbers, order, axis=1)
        return best_scores, best_numbers

    def rows(self, numbers: np.ndarray) -> np.ndarray:
        """(len(numbers), D) float32 descriptors of the images numbered `numbers`, copied."""
        numbers = np.asarray(numbers, dtype=np.int64)
        rows = np.empty((len(numbers), self.dim), dtype=np.float32)
        firsts = np.array([segment.first_image for segment in self.segments], dtype=np.int64)
        owner = np.searchsorted(firsts, numbers, side="right") - 1
        for position, segment in enumerate(self.segments):
            mine = np.flatnonzero(owner == position)
            if len(mine):
                rows[mine] = np.take(segment.descriptors, numbers[mine] - segment.first_image, axis=0)
        return rows

    def num_bytes(self) -> int:
        """Size of the index files on disk (the manifest included)."""
        return self.files.num_bytes()


def locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """One writer of the global index in `directory` at a time (index_files.locked)."""
    return index_files.locked(directory, WHAT)


def _changed_image(index: GlobalIndex, source: GlobalSource, image_ids: Sequence[str], progress: bool) -> str | None:
    """The first of `image_ids` indexed with another checksum than the source's now, or None."""
    indexed = [image_id for image_id in image_ids if image_id in index.number_of]
    for image_id in tqdm(indexed, desc=f"{WHAT}: compare with the store", unit="image",
                         disable=not progress or len(indexed) < 10_000, leave=False):
        if source.checksum(image_id) != index.checksums[index.number_of[image_id]]:
            return image_id
    return None


def open_or_build_global_index(directory: str | os.PathLike, source: GlobalSource, image_ids: Sequence[str], *,
                               progress: bool = False) -> GlobalIndex:
    """The index in `directory` holding the current global descriptors of every one of `image_ids`:
    built, completed with the images it lacks, or rebuilt when an indexed image's features changed
    (or it was written by another version). On read-only storage an index in step with the store
    works as usual; one that needs a change is an error naming it."""
    directory = Path(directory)
    fingerprint = source.fingerprint()  # before anything is read: a later change shows next time
    with locked(directory):
        index = open_to_update(GlobalIndex.open, directory)
        if index is not None and (fingerprint is None or fingerprint != index.source_fingerprint):
            changed = _changed_image(index, source, image_ids, progress)
            if changed is not None:
                LOGGER.warning("rebuilding the %s in %s: the features of %r (and maybe others) changed",
                               WHAT, directory, changed)
                index = None
        if index is None:
            index = GlobalIndex.create(directory)
        missing = [image_id for image_id in image_ids if image_id not in index.number_of]
        if missing:
            LOGGER.info("%s %s: adding %d images", WHAT, directory, len(missing))
            index.add(source, missing, progress=progress)
            if index.needs_merge():
                index.merge()
        if set(index.number_of) <= set(image_ids):
            index.record_fingerprint(fingerprint)
        return index
