"""The ASMK index on disk: codebook + inverted file over words, built by streaming, memory-mapped.

Layout of an index directory (by default `<index store>.asmk` beside the feature store):

- `index.json`: format, descriptor size, codebook size, and the list of segments (the commit
  point: written atomically last, so an interrupted build or add leaves the previous index);
- `codebook.npy` (W, D) float32 centroids, `cells.npy` (C, D) for a two-level codebook;
- per segment (the images of one build or add step, numbered consecutively):
  `<segment>.offsets.npy` (W + 1) int64: entries of word w are rows offsets[w]:offsets[w + 1];
  `<segment>.images.npy` (E) uint32 image number of each entry, ascending within a word;
  `<segment>.codes.npy` (E, ceil(D / 8)) uint8 binarised residual of each entry;
  `<segment>.words.npy` (images) uint32 number of words of each image (its self-similarity);
  `<segment>.images.json` the image ids and the feature settings_hash of each image.

Every .npy is read with allow_pickle=False; entries and codes are memory-mapped, so a query
touches only the lists of its words. Per indexed image the files hold 4 + ceil(D / 8) bytes per
distinct word (about 9 KB for 1000 40-D descriptors) and a few bytes of bookkeeping.

Building streams image by image (`IndexSource`: one or several feature stores) and never holds
all descriptors: memory is the codebook sample (at most asmk.TRAIN_SAMPLE_BYTES, 256 MB) during
training, then one image plus at most SEGMENT_ENTRIES buffered entries (0.4 GB measured at D = 40
including the sort) while adding; a segment is written whenever the buffer fills. Images can be
added later (a new segment); segments are merged into one after a build and when more than
MAX_SEGMENTS accumulate, streaming in chunks of MERGE_CHUNK entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import TEMP_SUFFIX, atomic_output, atomic_write_text
from src.extraction.store import FeatureStore
from src.retrieval import asmk

LOGGER = logging.getLogger("delf.retrieval")

FORMAT = "delf-asmk-index-v1"
INDEX_SUFFIX = ".asmk"
META_FILE = "index.json"
SEGMENT_ENTRIES = 1 << 23  # ~8,500 images of 1000 features; ~140 MB buffered at D = 40
MAX_SEGMENTS = 8
MERGE_CHUNK = 1 << 22
_SEGMENT_FILES = ("offsets.npy", "images.npy", "codes.npy", "words.npy", "images.json")


class IndexSource(Protocol):
    """Where the database descriptors come from, one image at a time."""

    def descriptors(self, image_id: str) -> np.ndarray: ...

    def settings_hash(self, image_id: str) -> str: ...

    def fingerprint(self) -> str | None:
        """Changes whenever any image's descriptors or settings may have changed; None if unknown
        (then every indexed image's settings_hash is read again whenever the index is opened)."""


class StoreSource:
    """Database images spread over one or several feature stores (e.g. one per extraction
    worker); an id found in several is read from the first store holding it."""

    def __init__(self, stores: Sequence[FeatureStore]) -> None:
        self._stores = list(stores)
        self._store_of: dict[str, FeatureStore] = {}
        for store in stores:
            for image_id in store.image_ids():
                self._store_of.setdefault(image_id, store)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._store_of

    def descriptors(self, image_id: str) -> np.ndarray:
        return self._store_of[image_id].keypoints(image_id).descriptors

    def settings_hash(self, image_id: str) -> str:
        return self._store_of[image_id].attributes(image_id)["settings_hash"]

    def fingerprint(self) -> str:
        return "\n".join(store.state() for store in self._stores)


def index_path_for(store_path: str | os.PathLike) -> Path:
    """The default index directory of a feature store: `<store path>.asmk`."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + INDEX_SUFFIX)


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        if mmap and path.stat().st_size:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.size:
                # A plain read-only view of the mapping: np.memmap's indexing overhead is per call.
                return array.view(np.ndarray)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"ASMK index file {path} is unreadable ({error}); delete {path.parent} to rebuild") from None


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, np.ascontiguousarray(array), allow_pickle=False)


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

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_entries(self) -> int:
        return int(self.offsets[-1])


def _write_segment(
    directory: Path, name: str, first_image: int, num_words: int, images: np.ndarray, words: np.ndarray,
    codes: np.ndarray, words_per_image: np.ndarray, image_ids: list[str], settings_hashes: list[str],
) -> None:
    """Group entries (given in image order) by word and write the segment's files."""
    order = np.argsort(words, kind="stable")  # stable: image numbers stay ascending within a word
    offsets = np.concatenate([[0], np.cumsum(np.bincount(words, minlength=num_words))]).astype(np.int64)
    _save(directory / f"{name}.offsets.npy", offsets)
    _save(directory / f"{name}.images.npy", images[order].astype(np.uint32))
    _save(directory / f"{name}.codes.npy", codes[order])
    _save(directory / f"{name}.words.npy", np.asarray(words_per_image, dtype=np.uint32))
    atomic_write_text(directory / f"{name}.images.json",
                      json.dumps({"first_image": first_image, "image_ids": image_ids,
                                  "settings_hashes": settings_hashes}))


def _read_segment(directory: Path, name: str) -> _Segment:
    try:
        listing = json.loads((directory / f"{name}.images.json").read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"ASMK index segment {directory / name} is unreadable ({error}); "
                         f"delete {directory} to rebuild") from None
    return _Segment(
        name=name, first_image=int(listing["first_image"]),
        offsets=_load(directory / f"{name}.offsets.npy", mmap=False),
        images=_load(directory / f"{name}.images.npy", mmap=True),
        codes=_load(directory / f"{name}.codes.npy", mmap=True),
        words=_load(directory / f"{name}.words.npy", mmap=False),
        image_ids=list(listing["image_ids"]), settings_hashes=list(listing["settings_hashes"]),
    )


class AsmkIndex:
    """An ASMK index directory: add images, score a query against every indexed image."""

    def __init__(self, directory: Path, codebook: asmk.Codebook, segments: list[_Segment], next_segment: int,
                 source_fingerprint: str | None = None) -> None:
        self.directory = directory
        self.codebook = codebook
        # The source's fingerprint when every indexed image's settings were last checked against it.
        self.source_fingerprint = source_fingerprint
        self._kernel = asmk.kernel_of_hamming(codebook.dim)
        self._next_segment = next_segment
        self._forget_segments()
        for segment in segments:
            self._append(segment)

    def _forget_segments(self) -> None:
        self.segments: list[_Segment] = []
        self.image_ids: list[str] = []
        self.settings_hashes: list[str] = []
        self.number_of: dict[str, int] = {}
        self.words_per_image = np.zeros(0, dtype=np.int64)

    def _append(self, segment: _Segment) -> None:
        if segment.first_image != len(self.image_ids):
            raise InputError(f"ASMK index {self.directory} is inconsistent: {segment.name} starts at image "
                             f"{segment.first_image}, expected {len(self.image_ids)}; delete it to rebuild")
        self.segments.append(segment)
        self.number_of.update((image_id, segment.first_image + k) for k, image_id in enumerate(segment.image_ids))
        self.image_ids.extend(segment.image_ids)
        self.settings_hashes.extend(segment.settings_hashes)
        self.words_per_image = np.concatenate([self.words_per_image, segment.words.astype(np.int64)])

    # -- opening, creating ------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike, codebook: asmk.Codebook) -> AsmkIndex:
        """A new, empty index with this codebook (replaces any index in `directory`)."""
        directory = Path(directory)
        with _locked(directory):
            _clear(directory)
            _save(directory / "codebook.npy", codebook.centroids)
            if codebook.cells is not None:
                _save(directory / "cells.npy", codebook.cells)
            index = cls(directory, codebook, [], 0)
            index._commit()
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike) -> AsmkIndex | None:
        """The index in `directory`, or None if there is none."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        except (OSError, ValueError) as error:
            raise InputError(f"{meta_path} is not an ASMK index ({error}); delete {directory} to rebuild") from None
        cells = _load(directory / "cells.npy", mmap=False) if meta["two_level"] else None
        codebook = asmk.Codebook(_load(directory / "codebook.npy", mmap=False), cells)
        segments = [_read_segment(directory, name) for name in meta["segments"]]
        return cls(directory, codebook, segments, int(meta["next_segment"]), meta.get("source_fingerprint"))

    def _commit(self) -> None:
        """Write index.json (the commit point), then delete files no segment refers to."""
        meta = {
            "format": FORMAT, "dim": self.codebook.dim, "codebook_size": self.codebook.size,
            "two_level": self.codebook.cells is not None, "num_images": len(self.image_ids),
            "segments": [segment.name for segment in self.segments], "next_segment": self._next_segment,
            "source_fingerprint": self.source_fingerprint,
        }
        atomic_write_text(self.directory / META_FILE, json.dumps(meta, indent=1) + "\n")
        used = {f"{segment.name}.{suffix}" for segment in self.segments for suffix in _SEGMENT_FILES}
        for path in self.directory.glob("segment-*"):
            if path.name not in used:
                path.unlink(missing_ok=True)
        # Writers hold the directory lock, so temporaries present now were left by killed ones.
        for path in self.directory.glob(f".*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)

    # -- adding ----------------------------------------------------------------------------

    def add(self, source: IndexSource, image_ids: Iterable[str], *, progress: bool = False) -> None:
        """Append images (not yet indexed), streaming their descriptors one image at a time; a
        segment is committed whenever SEGMENT_ENTRIES entries are buffered, so an interrupted
        add keeps what was committed and a later add resumes with the rest."""
        with _locked(self.directory):
            self._add(source, image_ids, progress)

    def _add(self, source: IndexSource, image_ids: Iterable[str], progress: bool) -> None:
        pending = [i for i in dict.fromkeys(image_ids) if i not in self.number_of]
        buffer: dict[str, list] = {"images": [], "words": [], "codes": [], "counts": [], "ids": [], "hashes": []}
        buffered = 0
        first_image = len(self.image_ids)
        for image_id in tqdm(pending, desc="ASMK index: add images", unit="image", disable=not progress):
            descriptors = np.asarray(source.descriptors(image_id))
            if len(descriptors) and (descriptors.ndim != 2 or descriptors.shape[1] != self.codebook.dim):
                raise InputError(f"descriptors of {image_id!r} have shape {descriptors.shape}, but the ASMK index "
                                 f"in {self.directory} holds {self.codebook.dim}-D descriptors")
            words, codes = asmk.image_words(descriptors, self.codebook, 1, asmk.DATABASE_PROBES)
            number = first_image + len(buffer["ids"])
            buffer["images"].append(np.full(len(words), number, dtype=np.uint32))
            buffer["words"].append(words)
            buffer["codes"].append(codes)
            buffer["counts"].append(len(words))
            buffer["ids"].append(image_id)
            buffer["hashes"].append(source.settings_hash(image_id))
            buffered += len(words)
            if buffered >= SEGMENT_ENTRIES:
                first_image = self._flush(buffer, first_image)
                buffered = 0
        if buffer["ids"]:
            self._flush(buffer, first_image)

    def _flush(self, buffer: dict[str, list], first_image: int) -> int:
        """Write the buffered images as a new segment and commit it; returns the next image number."""
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        codes_width = (self.codebook.dim + 7) // 8
        _write_segment(
            self.directory, name, first_image, self.codebook.size,
            np.concatenate(buffer["images"]) if buffer["images"] else np.zeros(0, np.uint32),
            np.concatenate(buffer["words"]) if buffer["words"] else np.zeros(0, np.int64),
            np.concatenate(buffer["codes"]) if buffer["codes"] else np.zeros((0, codes_width), np.uint8),
            np.asarray(buffer["counts"]), buffer["ids"], buffer["hashes"],
        )
        self._attach(name)
        for values in buffer.values():
            values.clear()
        return len(self.image_ids)

    def _attach(self, name: str) -> None:
        """Open a written segment, add it to this index and commit."""
        self._append(_read_segment(self.directory, name))
        self._commit()

    def merge(self) -> None:
        """Rewrite all segments as one, streaming MERGE_CHUNK entries at a time."""
        if len(self.segments) < 2:
            return
        with _locked(self.directory):
            self._merge()

    def _merge(self) -> None:
        name = f"segment-{self._next_segment:06d}"
        self._next_segment += 1
        counts = sum(np.diff(segment.offsets) for segment in self.segments)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total, width = int(offsets[-1]), (self.codebook.dim + 7) // 8
        written = offsets[:-1].copy()  # next free row of each word in the merged lists
        if total == 0:  # only feature-less images: nothing to map
            _save(self.directory / f"{name}.images.npy", np.zeros(0, np.uint32))
            _save(self.directory / f"{name}.codes.npy", np.zeros((0, width), np.uint8))
        else:
            with contextlib.ExitStack() as stack:
                images_path = stack.enter_context(atomic_output(self.directory / f"{name}.images.npy"))
                codes_path = stack.enter_context(atomic_output(self.directory / f"{name}.codes.npy"))
                images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint32, shape=(total,))
                codes = np.lib.format.open_memmap(codes_path, mode="w+", dtype=np.uint8, shape=(total, width))
                for segment in self.segments:  # in image order, so lists stay sorted by image
                    shift = written - segment.offsets[:-1]
                    for start in range(0, segment.num_entries, MERGE_CHUNK):
                        stop = min(start + MERGE_CHUNK, segment.num_entries)
                        rows = np.arange(start, stop)
                        destination = rows + shift[np.searchsorted(segment.offsets, rows, side="right") - 1]
                        images[destination] = segment.images[start:stop]
                        codes[destination] = segment.codes[start:stop]
                    written += np.diff(segment.offsets)
                images.flush()
                codes.flush()
                del images, codes
        _save(self.directory / f"{name}.offsets.npy", offsets)
        _save(self.directory / f"{name}.words.npy", self.words_per_image.astype(np.uint32))
        atomic_write_text(self.directory / f"{name}.images.json",
                          json.dumps({"first_image": 0, "image_ids": self.image_ids,
                                      "settings_hashes": self.settings_hashes}))
        self._forget_segments()
        self._attach(name)

    # -- searching --------------------------------------------------------------------------

    def scores(self, descriptors: np.ndarray, assignments: int = asmk.QUERY_ASSIGNMENTS) -> np.ndarray:
        """(num indexed images,) ASMK similarity of a query (its descriptors) to each image."""
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
        return np.nan_to_num(scores, nan=0.0, posinf=0.0)

    def num_bytes(self) -> int:
        """Size of the index files on disk."""
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())


_HELD_LOCKS: set[Path] = set()


@contextlib.contextmanager
def _locked(directory: Path):
    """One writer at a time (flock on the index directory; re-entrant within this process);
    readers need no lock."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _HELD_LOCKS:
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(key)
        yield
    finally:
        _HELD_LOCKS.discard(key)
        os.close(handle)


def _sample_descriptors(source: IndexSource, image_ids: Sequence[str], words: int, seed: int,
                        progress: bool) -> np.ndarray:
    """Descriptors of randomly chosen images: TRAIN_POINTS_PER_WORD per word, within TRAIN_SAMPLE_BYTES."""
    rng = np.random.default_rng(seed)
    taken, rows, wanted = [], 0, None
    order = rng.permutation(len(image_ids))
    bar = tqdm(total=len(order), desc="ASMK codebook: sample images", unit="image", disable=not progress, leave=False)
    for position in order:
        descriptors = np.asarray(source.descriptors(image_ids[position]), dtype=np.float32)
        bar.update()
        if not len(descriptors):
            continue
        if wanted is None:
            wanted = min(words * asmk.TRAIN_POINTS_PER_WORD, asmk.TRAIN_SAMPLE_BYTES // (4 * descriptors.shape[1]))
        taken.append(descriptors)
        rows += len(descriptors)
        if rows >= wanted:
            break
    bar.close()
    if not taken:
        raise InputError("the database has no descriptors to train an ASMK codebook from")
    sizes = {d.shape[1] for d in taken}
    if len(sizes) > 1:
        raise InputError(f"database descriptors have different sizes {sorted(sizes)} (mixed extractions?)")
    sample = np.concatenate(taken)
    if len(sample) > wanted:
        sample = sample[np.sort(rng.choice(len(sample), wanted, replace=False))]
    return sample


def build_index(
    directory: str | os.PathLike, source: IndexSource, image_ids: Sequence[str], *, codebook_size: int = 0,
    seed: int = 0, progress: bool = False,
) -> AsmkIndex:
    """Train a codebook on a sample of the images and index them all (replacing any index there).

    codebook_size 0 = asmk.default_codebook_size(len(image_ids)), lowered to a power of two with
    at least MIN_TRAIN_POINTS_PER_WORD sample descriptors per word for small databases.
    """
    directory = Path(directory)
    with _locked(directory):
        return _build(directory, source, image_ids, codebook_size, seed, progress)


def _build(directory, source, image_ids, codebook_size, seed, progress) -> AsmkIndex:
    words = codebook_size or asmk.default_codebook_size(len(image_ids))
    sample = _sample_descriptors(source, image_ids, words, seed, progress)
    if codebook_size and len(sample) < codebook_size:
        raise InputError(f"codebook_size {codebook_size} needs at least as many database descriptors; "
                         f"the database has {len(sample)}")
    if not codebook_size:
        affordable = max(1, len(sample) // asmk.MIN_TRAIN_POINTS_PER_WORD)
        words = min(words, 2 ** int(np.log2(affordable)))
    LOGGER.info("ASMK: training %d words on %d descriptors", words, len(sample))
    codebook = asmk.train_codebook(sample, words, seed)
    del sample
    index = AsmkIndex.create(directory, codebook)
    index.add(source, image_ids, progress=progress)
    index.merge()
    return index


def _clear(directory: Path) -> None:
    """Remove an index's files from its directory (nothing else)."""
    for path in directory.iterdir():
        ours = path.name in (META_FILE, "codebook.npy", "cells.npy") or path.name.startswith("segment-")
        if ours or (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)):
            path.unlink()


def open_or_build_index(
    directory: str | os.PathLike, source: IndexSource, image_ids: Sequence[str], *, codebook_size: int = 0,
    seed: int = 0, progress: bool = False,
) -> AsmkIndex:
    """The index in `directory` holding every one of `image_ids`, built or completed as needed.

    An existing index is reused and the missing images are added (without retraining the
    codebook). It is rebuilt when an indexed image's features were re-extracted with other
    settings (settings_hash differs), or when `codebook_size` is set and differs from its size.
    The settings are read only when the source's fingerprint differs from the one recorded when
    they were last checked (a store that has not changed is not read again: ~0.2 ms an image).
    """
    directory = Path(directory)
    fingerprint = source.fingerprint()  # before anything is read: a later change shows next time
    with _locked(directory):
        index = AsmkIndex.open(directory)
        if index is not None:
            reason = None
            if codebook_size and codebook_size != index.codebook.size:
                reason = f"it has {index.codebook.size} words, {codebook_size} asked"
            elif fingerprint is None or fingerprint != index.source_fingerprint:
                stale = next((i for i in image_ids if i in index.number_of
                              and index.settings_hashes[index.number_of[i]] != source.settings_hash(i)), None)
                if stale is not None:
                    reason = f"the features of {stale!r} (and maybe others) were extracted again"
            if reason:
                LOGGER.warning("rebuilding the ASMK index in %s: %s", directory, reason)
                index = None
        if index is None:
            index = _build(directory, source, image_ids, codebook_size, seed, progress)
        else:
            missing = [i for i in image_ids if i not in index.number_of]
            if missing:
                LOGGER.info("ASMK index %s: adding %d images", directory, len(missing))
                index.add(source, missing, progress=progress)
                if len(index.segments) > MAX_SEGMENTS:
                    index.merge()
        # Record the fingerprint only when every indexed image was just checked (or built) against it.
        if index.source_fingerprint != fingerprint and set(index.image_ids) <= set(image_ids):
            index.source_fingerprint = fingerprint
            index._commit()
        return index
