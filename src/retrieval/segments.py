"""The segments of an ASMK index: one build or add step's images, their entries grouped by word.

A segment `<name>` is five checked files (index_files.IndexFiles):
  `<name>.offsets.npy` (W + 1) int64: entries of word w are rows offsets[w]:offsets[w + 1];
  `<name>.images.npy` (E) uint32 image number of each entry, ascending within a word;
  `<name>.codes.npy` (E, ceil(D / 8)) uint8 binarised residual of each entry;
  `<name>.words.npy` (images) uint32 number of words (= entries) of each image;
  `<name>.images.json` each image's id, feature settings_hash and feature checksum.

Reading checks shapes, dtypes and consistency; merging streams MERGE_CHUNK entries at a time in
word order with plain writes, after a check for room (a full disk is one line, never a SIGBUS from
a mapped file).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from src.retrieval.index_files import IndexFiles, read_image_listing

FILES = ("offsets.npy", "images.npy", "codes.npy", "words.npy", "images.json")
NAME = re.compile(r"segment-\d{6}")
MERGE_CHUNK = 1 << 22


@dataclass
class Segment:
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


def read_segment(files: IndexFiles, name: str, num_words: int, code_width: int, deep: bool) -> Segment:
    """One segment's files, their shapes and consistency checked (and the image numbers' range
    when `deep`: the files were just verified in full)."""
    first_image, image_ids, settings_hashes, checksums = read_image_listing(files, name, "settings_hashes",
                                                                            "checksums")
    offsets = files.load_array(f"{name}.offsets.npy", np.int64, 1)
    images = files.load_array(f"{name}.images.npy", np.uint32, 1, mmap=True)
    codes = files.load_array(f"{name}.codes.npy", np.uint8, 2, mmap=True)
    words = files.load_array(f"{name}.words.npy", np.uint32, 1)
    entries = int(words.sum(dtype=np.int64))
    problem = None
    if len(offsets) != num_words + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        problem = f"{name}.offsets.npy is not {num_words + 1} ascending offsets from 0"
    elif not offsets[-1] == len(images) == len(codes) == entries:
        problem = (f"{name} has {offsets[-1]} entries by its offsets, {len(images)} image numbers, "
                   f"{len(codes)} codes and {entries} by its words per image")
    elif codes.shape[1] != code_width or len(words) != len(image_ids):
        problem = f"{name} has codes of {codes.shape[1]} bytes and {len(words)} words per image for " \
                  f"{len(image_ids)} images"
    elif deep and len(images) and (images.min() < first_image or images.max() >= first_image + len(image_ids)):
        problem = f"{name}.images.npy has image numbers outside {first_image}..{first_image + len(image_ids) - 1}"
    if problem:
        raise files.damaged(problem)
    return Segment(name, first_image, offsets, images, codes, words, image_ids, settings_hashes, checksums)


def write_segment(files: IndexFiles, name: str, first_image: int, num_words: int, code_width: int,
                  buffer: Mapping[str, list]) -> None:
    """Write images numbered from `first_image` as segment `name`: `buffer` holds, per image, its
    "words", "codes", "counts" (of words), "ids", "hashes" (settings) and "checksums"."""
    counts = np.asarray(buffer["counts"], dtype=np.int64)
    words = np.concatenate(buffer["words"]) if buffer["words"] else np.zeros(0, np.int64)
    codes = np.concatenate(buffer["codes"]) if buffer["codes"] else np.zeros((0, code_width), np.uint8)
    images = np.repeat(np.arange(first_image, first_image + len(counts), dtype=np.uint32), counts)
    order = np.argsort(words, kind="stable")  # stable: image numbers stay ascending within a word
    files.write_array(f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(np.bincount(words, minlength=num_words))]))
    files.write_array(f"{name}.images.npy", images[order])
    files.write_array(f"{name}.codes.npy", codes[order])
    files.write_array(f"{name}.words.npy", counts.astype(np.uint32))
    files.write_json(f"{name}.images.json", {"first_image": first_image, "image_ids": buffer["ids"],
                                             "settings_hashes": buffer["hashes"], "checksums": buffer["checksums"]})


def write_merged_segment(files: IndexFiles, name: str, segments: Sequence[Segment], live: np.ndarray,
                         code_width: int, images_of: Mapping[str, Sequence]) -> None:
    """Write `segments` (consecutive, from image 0) as one segment `name` of the `live` images
    (renumbered in order), streaming. `images_of` holds "image_ids", "settings_hashes",
    "checksums" and "words_per_image" of every image number."""
    new_number = (np.cumsum(live) - 1).astype(np.uint32)
    counts = sum(np.diff(segment.offsets) for segment in segments)  # per word, removed images included
    words_per_image = np.asarray(images_of["words_per_image"])
    total = int(counts.sum()) - int(words_per_image[~live].sum())
    kept = {key: [value for value, keep in zip(images_of[key], live, strict=True) if keep]
            for key in ("image_ids", "settings_hashes", "checksums")}
    # Entries, offsets, words per image, and the image listing (ids and two hashes, ~100 bytes).
    files.require_room(total * (4 + code_width) + 8 * len(counts) + 200 * len(kept["image_ids"]) + 2**16,
                       "merging its segments")
    kept_counts = np.zeros(len(counts), dtype=np.int64)
    with files.array_writer(f"{name}.images.npy", np.uint32, (total,)) as images_out, \
            files.array_writer(f"{name}.codes.npy", np.uint8, (total, code_width)) as codes_out:
        for first, last, images, codes, chunk_counts in _entries_in_word_order(segments, counts, code_width):
            keep = live[images]
            if keep.all():
                kept_counts[first:last] += chunk_counts
            else:
                words = np.repeat(np.arange(last - first), chunk_counts)[keep]
                kept_counts[first:last] += np.bincount(words, minlength=last - first)
                images, codes = images[keep], codes[keep]
            images_out.write(new_number[images])
            codes_out.write(codes)
    files.write_array(f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(kept_counts)]))
    files.write_array(f"{name}.words.npy", words_per_image[live].astype(np.uint32))
    files.write_json(f"{name}.images.json", {"first_image": 0, **kept})


def _entries_in_word_order(segments: Sequence[Segment], counts: np.ndarray,
                           code_width: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
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
        codes = np.empty((size, code_width), dtype=np.uint8)
        written = np.concatenate([[0], np.cumsum(chunk_counts)[:-1]])  # next free row of each word
        for segment in segments:  # in image order, so lists stay sorted by image
            begin, end = int(segment.offsets[first]), int(segment.offsets[last])
            segment_counts = np.diff(segment.offsets[first : last + 1])
            destination = np.repeat(written - (segment.offsets[first:last] - begin), segment_counts) + \
                np.arange(end - begin)
            images[destination] = segment.images[begin:end]
            codes[destination] = segment.codes[begin:end]
            written += segment_counts
        yield first, last, images, codes, chunk_counts
        first = last
