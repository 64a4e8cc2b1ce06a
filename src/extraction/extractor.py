"""Multi-scale DELF feature extraction: image -> pyramid -> DelfModel -> keypoints -> PCA -> store.

Each pyramid level runs at its own size (no fixed canvas). The output of every image is a
`LocalFeatures`: locations (N, 2) as (y, x) in original-image pixels, descriptors (N, 40),
scales (N,) = 1 / pyramid scale, attention (N,).

A folder is extracted image by image into a resumable feature store; an image that cannot be
read or processed is reported (and listed in `<store>.failures.txt`), never recorded as done,
and never stops the others.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mindspore import Tensor
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import atomic_write_text
from src.extraction.images import crop_to_box, load_image, read_image
from src.extraction.keypoints import select_keypoints
from src.extraction.pca import PcaParameters, load_pca, postprocess_descriptors
from src.extraction.pyramid import LevelInput, PyramidLevel, needed_image_size, pyramid_inputs
from src.extraction.store import FeatureStore, LocalFeatures

LOGGER = logging.getLogger("delf.extract")
FAILURES_SUFFIX = ".failures.txt"


def empty_features(depth: int) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                         np.zeros((0, depth), np.float32), np.zeros(0, np.float32))


class DelfExtractor:
    """Runs the network over the pyramid of one image and turns the maps into LocalFeatures."""

    def __init__(self, model, config: ExtractionConfig, pca: PcaParameters | None = None) -> None:
        self.model = model
        self.model.set_train(False)
        self.config = config
        self.pca = pca

    def pyramid(self, image: np.ndarray, name: str = "") -> list[PyramidLevel]:
        """Attention and block3 maps of every usable scale; locations refer to `image`'s pixels."""
        return self.run_levels(pyramid_inputs(image, self.config, name))

    def run_levels(self, inputs: Sequence[LevelInput]) -> list[PyramidLevel]:
        """The network's attention and block3 maps of prepared pyramid inputs."""
        levels = []
        for level in inputs:
            attention, features = self.model(Tensor(level.image))
            levels.append(PyramidLevel(level.scale, level.scale_yx, attention.asnumpy()[0, 0],
                                       features.asnumpy()[0]))
        return levels

    def __call__(self, image: np.ndarray, name: str = "") -> LocalFeatures:
        return features_from_levels(self.pyramid(image, name), self.config, self.pca, name)

    def extract_file(self, path: Path, crop: Sequence[float] | None = None) -> tuple[LocalFeatures, tuple[int, int]]:
        """Features of an image file (of its [x1, y1, x2, y2] `crop`) and the (h, w) they refer to.

        Memory stays bounded for any image: a large JPEG is decoded only as large as the top
        pyramid level needs, and the decoded image is freed before the network runs.
        """
        if crop is None:
            image, size = read_image(path, functools.partial(needed_image_size, config=self.config))
        else:
            image = crop_to_box(load_image(path), crop)
            size = image.shape[:2]
        inputs = pyramid_inputs(image, self.config, str(path), size)
        del image  # can be far larger than every level; `inputs` holds all the network needs
        levels = self.run_levels(inputs)
        del inputs
        return features_from_levels(levels, self.config, self.pca, str(path)), size


def features_from_levels(levels: Sequence[PyramidLevel], config: ExtractionConfig, pca: PcaParameters | None,
                         name: str = "") -> LocalFeatures:
    """Keypoints and final descriptors of one image from its pyramid maps (also the 310 postprocess)."""
    if not levels:  # no level the network could run on (pyramid.level_sizes warned)
        return empty_features(config.pca_dim if pca is not None else config.feature_depth)
    for level in levels:
        if not (np.isfinite(level.attention).all() and np.isfinite(level.features).all()):
            raise InputError(f"{name or 'image'}: the network gave non-finite values at scale {level.scale:g} "
                             "(are the weights damaged?)")
    locations, descriptors, scales, attention = select_keypoints(levels, config)
    if len(locations) == 0:
        LOGGER.warning("%s: no keypoint has attention >= score_threshold %g; lower "
                       "extraction.score_threshold for this model", name or "image", config.score_threshold)
    descriptors = postprocess_descriptors(descriptors, pca, config.pca_dim, config.use_whitening)
    return LocalFeatures(locations, scales, descriptors, attention)


def extract(images: Iterable[np.ndarray], model, config: ExtractionConfig,
            pca: PcaParameters | None = None) -> list[LocalFeatures]:
    """Features of uint8 RGB images with a DelfModel in state 'test' (PCA when config.use_pca)."""
    if config.use_pca and pca is None:
        pca = load_pca(config)
    extractor = DelfExtractor(model, config, pca if config.use_pca else None)
    return [extractor(image) for image in images]


@dataclass
class ExtractionReport:
    extracted: int = 0
    skipped: int = 0  # already done with the same settings
    failed: dict[str, str] = field(default_factory=dict)  # image id -> "path: reason"

    def merge(self, other: ExtractionReport) -> None:
        self.extracted += other.extracted
        self.skipped += other.skipped
        self.failed.update(other.failed)


def extract_to_store(image_paths: Mapping[str, Path], store: FeatureStore, extractor: DelfExtractor,
                     settings_hash: str, crops: Mapping[str, Sequence[float]] | None = None,
                     progress: bool = True, progress_label: str = "extract") -> ExtractionReport:
    """Extract every image not yet in `store` with these settings; resumable image by image.

    `crops` maps an image id to an [x1, y1, x2, y2] box to extract from (queries of the retrieval
    protocol); locations are then relative to the crop. An image that fails is logged and
    reported; the others go on. A full disk stops the run (what is stored stays stored).
    """
    report = ExtractionReport()
    todo = {image_id: path for image_id, path in image_paths.items() if not store.is_done(image_id, settings_hash)}
    report.skipped = len(image_paths) - len(todo)
    for image_id, path in tqdm(todo.items(), desc=progress_label, unit="image", disable=not progress):
        try:
            features, image_size = extractor.extract_file(path, crops.get(image_id) if crops else None)
        except (InputError, MemoryError, RuntimeError, ValueError) as error:
            # One bad image (corrupt, too large, a network failure on its sizes) must not end a long run.
            reason = " ".join(str(error).split()) or type(error).__name__
            report.failed[image_id] = reason if str(path) in reason else f"{path}: {reason}"
            LOGGER.error("%s failed: %s", image_id, reason)
            continue
        try:
            store.put(image_id, features, image_size=image_size, settings_hash=settings_hash)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InputError(f"no space left on device while writing {store.path}; "
                                 f"{report.extracted + report.skipped} images are safely stored; "
                                 "free space and rerun to resume") from None
            raise
        LOGGER.info("%s: %d features", image_id, len(features.locations))
        report.extracted += 1
    return report


def failures_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + FAILURES_SUFFIX)


def write_failures(store_path: str | Path, failed: Mapping[str, str]) -> Path | None:
    """List the images that failed beside the store (one 'id<TAB>reason' a line); None if none failed."""
    path = failures_path(store_path)
    if not failed:
        path.unlink(missing_ok=True)
        return None
    atomic_write_text(path, "".join(f"{image_id}\t{reason}\n" for image_id, reason in sorted(failed.items())))
    return path


def extract_folder(image_paths: Mapping[str, Path], store_path: str | Path, extractor: DelfExtractor,
                   settings_hash: str) -> ExtractionReport:
    """extract_to_store into a store file, then compact it and write (or clear) its failures list."""
    with FeatureStore(store_path) as store:
        report = extract_to_store(image_paths, store, extractor, settings_hash)
        store.compact()  # also merges the journal of an earlier run that stopped before compacting
    write_failures(store_path, report.failed)
    return report
