"""Building and updating the ASMK index of a database: from feature stores, by streaming.

Building never holds all descriptors: memory is the codebook sample (at most
asmk.TRAIN_SAMPLE_BYTES, 256 MB) during training, then what `AsmkIndex.add` buffers.

`open_or_build_index` keeps an index in step with its feature store(s). Each indexed image
records its features' settings_hash and checksum (the store's per-image CRC-32): an image whose
features changed is indexed again (its old entries are dropped at the next merge); one extracted
with other settings means another descriptor space, so the index is rebuilt with a new codebook.
The checksums are read only when the stores' fingerprint differs from the one recorded when they
were last all compared (a store that has not changed is not read again: ~0.2 ms an image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from src.extraction.features import features_checksum
from src.extraction.store import FeatureStore
from src.retrieval import asmk
from src.retrieval.index_files import open_to_update
from src.retrieval.inverted_file import MAX_SEGMENTS, AsmkIndex, IndexSource, locked

LOGGER = logging.getLogger("delf.retrieval")

INDEX_SUFFIX = ".asmk"
# Removed (re-indexed) images' entries are dropped by a merge once they are this share of the images.
MAX_REMOVED_SHARE = 0.1


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

    def content(self, image_id: str) -> tuple[str, str]:
        store = self._store_of[image_id]
        settings_hash, checksum = store.content(image_id)
        if checksum is None:  # stored before checksums existed: computed from the data
            checksum = features_checksum(store.get(image_id), store.attributes(image_id)["image_size"], settings_hash)
        return settings_hash, checksum

    def fingerprint(self) -> str:
        return "\n".join(store.state() for store in self._stores)


def index_path_for(store_path: str | os.PathLike) -> Path:
    """The default index directory of a feature store: `<store path>.asmk`."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + INDEX_SUFFIX)


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
    with locked(directory):
        return _build(directory, source, image_ids, codebook_size, seed, progress)


def _build(directory: Path, source: IndexSource, image_ids: Sequence[str], codebook_size: int, seed: int,
           progress: bool) -> AsmkIndex:
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


def _compare_contents(index: AsmkIndex, source: IndexSource, image_ids: Sequence[str],
                      progress: bool) -> tuple[str | None, list[str]]:
    """(why the index must be rebuilt or None, the indexed images whose features changed)."""
    changed = []
    indexed = [image_id for image_id in image_ids if image_id in index.number_of]
    for image_id in tqdm(indexed, desc="ASMK index: compare with the store", unit="image",
                         disable=not progress or len(indexed) < 10_000, leave=False):
        number = index.number_of[image_id]
        settings_hash, checksum = source.content(image_id)
        if settings_hash != index.settings_hashes[number]:
            return f"the features of {image_id!r} (and maybe others) were extracted again with other settings", []
        if checksum != index.checksums[number]:
            changed.append(image_id)
    return None, changed


def open_or_build_index(
    directory: str | os.PathLike, source: IndexSource, image_ids: Sequence[str], *, codebook_size: int = 0,
    stop_word_share: float = 1.0, seed: int = 0, progress: bool = False,
) -> AsmkIndex:
    """The index in `directory` holding the current features of every one of `image_ids`, built,
    completed or updated as needed.

    An existing index is reused: missing images are added and images whose features changed are
    indexed again (without retraining the codebook). It is rebuilt when an indexed image's
    features were extracted with other settings, when `codebook_size` is set and differs from its
    size, or when it was written by an older version. On read-only storage an index in step with
    the store works as usual; one that needs a change is an error naming it. Its stop list is
    decided with `stop_word_share` (AsmkIndex.set_stop_words).
    """
    directory = Path(directory)
    fingerprint = source.fingerprint()  # before anything is read: a later change shows next time
    with locked(directory):
        index = open_to_update(AsmkIndex.open, directory)
        if index is not None:
            reason, changed = None, []
            if codebook_size and codebook_size != index.codebook.size:
                reason = f"it has {index.codebook.size} words, {codebook_size} asked"
            elif fingerprint is None or fingerprint != index.source_fingerprint:
                reason, changed = _compare_contents(index, source, image_ids, progress)
            if reason:
                LOGGER.warning("rebuilding the ASMK index in %s: %s", directory, reason)
                index = None
            elif changed:
                LOGGER.warning("ASMK index %s: the features of %d indexed image(s) changed (e.g. %r); indexing "
                               "them again", directory, len(changed), changed[0])
                index.remove(changed)
        if index is None:
            index = _build(directory, source, image_ids, codebook_size, seed, progress)
        else:
            missing = [i for i in image_ids if i not in index.number_of]
            if missing:
                LOGGER.info("ASMK index %s: adding %d images", directory, len(missing))
                index.add(source, missing, progress=progress)
            if len(index.segments) > MAX_SEGMENTS or len(index.removed) > MAX_REMOVED_SHARE * len(index.image_ids):
                index.merge()
        index.set_stop_words(stop_word_share)
        # Record the fingerprint only when every indexed image was just compared (or built) against it.
        if set(index.number_of) <= set(image_ids):
            index.record_fingerprint(fingerprint)
        return index
