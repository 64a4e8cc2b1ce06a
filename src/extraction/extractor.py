"""Multi-scale DELF / DELG feature extraction: image -> pyramid -> network -> keypoints -> PCA -> store.

Each pyramid level runs at its own size (no fixed canvas). The output of every image is an
`ImageFeatures`: its `LocalFeatures` (locations (N, 2) as (y, x) in original-image pixels,
descriptors (N, D), scales (N,) = 1 / pyramid scale, attention (N,)) and, for a DELG model, its
global descriptor.

DELG (src/model/delg.py) runs once per level and gives every output in that pass: the local
descriptors are its autoencoder code, L2-normalised, never PCA-projected (a DELG model with
extraction.use_pca true is refused); the global descriptor comes from the levels of
extraction.global_scale_indices only, as TF DELG's extractor makes it: each level's raw row
L2-normalised, summed, L2-normalised.

A folder is extracted image by image into a resumable feature store; an image that cannot be
read or processed is reported (and listed in `<store>.failures.txt`), never recorded as done,
and never stops the others. While the network runs on one image, one background thread decodes
and resizes the next (a bounded queue: at most `prefetch` prepared images wait in memory).
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from mindspore import Tensor
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import atomic_write_text, directory_lock
from src.extraction.features import LocalFeatures
from src.extraction.images import failure_reason
from src.extraction.keypoints import select_keypoints
from src.extraction.pca import PcaParameters, load_pca, pca_digest, postprocess_descriptors
from src.extraction.pyramid import LevelInput, PyramidLevel, pyramid_inputs, read_for_pyramid
from src.extraction.store import FAILURES_SUFFIX, FeatureStore
from src.model.delg import combine_global_descriptors
from src.model.network import min_input_side
from src.model.shapes import set_input_shapes

LOGGER = logging.getLogger("delf.extract")
# Errors that fail one image and let the run go on (corrupt file, too large, a network failure on its sizes).
IMAGE_ERRORS = (InputError, MemoryError, RuntimeError, ValueError)


def empty_features(depth: int) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                         np.zeros((0, depth), np.float32), np.zeros(0, np.float32))


class ImageFeatures(NamedTuple):
    """What extraction gives for one image."""

    local: LocalFeatures
    global_descriptor: np.ndarray | None  # (G,) float32 of unit L2 norm (DELG); None for DELF


def check_model_settings(kind: str, config: ExtractionConfig, source: str = "") -> None:
    """InputError (one line) when the extraction settings do not suit a model of this kind ('delf'
    or 'delg'). DELG: no PCA (its local descriptors are the autoencoder's code, which TF's DELG
    configs use as is), and every global scale index must lie in the pyramid."""
    if kind != "delg":
        return
    if config.use_pca:
        raise InputError(f"{source or 'the model'} is a DELG model: its local descriptors are the autoencoder's "
                         "code, used without PCA; set extraction.use_pca false (the DELG presets do)")
    config.global_image_scales()  # ConfigError naming the index past the pyramid


class DelfExtractor:
    """Runs the network (DELF or DELG) over the pyramid of one image and turns its outputs into ImageFeatures.

    In graph mode the network is compiled once for every image size (input_shapes 'dynamic',
    src/model/shapes.py) unless input_shapes is 'static'.
    """

    def __init__(self, model, config: ExtractionConfig, pca: PcaParameters | None = None,
                 input_shapes: str = "dynamic") -> None:
        self.model = set_input_shapes(model, input_shapes)
        self.model.set_train(False)
        self.config = config
        self.pca = pca
        self.min_side = min_input_side(getattr(model, "backbone_name", "keras"))
        self.kind = getattr(model, "kind", "delf")
        check_model_settings(self.kind, config)

    def inputs(self, image: np.ndarray, name: str = "", full_size: tuple[int, int] | None = None
               ) -> list[LevelInput]:
        """The network input of every pyramid level (CPU work: resize, normalise)."""
        return pyramid_inputs(image, self.config, name, self.min_side, full_size)

    def file_inputs(self, path: Path, crop: Sequence[float] | None = None
                    ) -> tuple[list[LevelInput], tuple[int, int]]:
        """The level inputs of an image file (of its [x1, y1, x2, y2] `crop`) and the (h, w) they refer to.

        Memory stays bounded for any image: a large JPEG is decoded only as large as the top
        pyramid level needs, and the decoded image is freed before the network runs.
        """
        image, size = read_for_pyramid(path, self.config, crop)
        return self.inputs(image, str(path), size), size

    def run_network(self, inputs: Sequence[LevelInput]) -> list[PyramidLevel]:
        """The network's outputs on every level input, one pass each: attention and local-descriptor
        maps, and DELG's raw global descriptor."""
        levels = []
        for level in inputs:
            outputs = self.model(Tensor(level.image))
            global_row = outputs[2].asnumpy()[0] if len(outputs) > 2 else None
            levels.append(PyramidLevel(level.scale, level.scale_yx, outputs[0].asnumpy()[0, 0], outputs[1].asnumpy()[0],
                                       global_descriptor=global_row, resize_yx=level.resize_yx))
        return levels

    def pyramid(self, image: np.ndarray, name: str = "") -> list[PyramidLevel]:
        """The network's outputs at every usable scale; locations refer to `image`'s pixels."""
        return self.run_network(self.inputs(image, name))

    def image_features(self, inputs: Sequence[LevelInput], name: str = "") -> ImageFeatures:
        """ImageFeatures of one image from its level inputs (`inputs`)."""
        return image_features_from_levels(self.run_network(inputs), self.config, self.pca, self.kind, name)

    def features(self, inputs: Sequence[LevelInput], name: str = "") -> LocalFeatures:
        """LocalFeatures of one image from its level inputs (`inputs`)."""
        return self.image_features(inputs, name).local

    def __call__(self, image: np.ndarray, name: str = "") -> LocalFeatures:
        return self.features(self.inputs(image, name), name)

    def extract_file(self, path: Path, crop: Sequence[float] | None = None) -> tuple[LocalFeatures, tuple[int, int]]:
        """Local features of an image file (of its [x1, y1, x2, y2] `crop`) and the (h, w) they refer to."""
        inputs, size = self.file_inputs(path, crop)
        return self.features(inputs, str(path)), size


def features_from_levels(levels: Sequence[PyramidLevel], config: ExtractionConfig, pca: PcaParameters | None,
                         name: str = "") -> LocalFeatures:
    """Keypoints and final local descriptors of one image from its pyramid maps."""
    if not levels:  # no level the network could run on (pyramid_plan warned)
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


def global_descriptor_from_levels(levels: Sequence[PyramidLevel], config: ExtractionConfig,
                                  name: str = "") -> np.ndarray:
    """An image's DELG global descriptor from the raw rows of its levels at the global scales
    (extraction.global_scale_indices); InputError when none of them could run (too small an image)."""
    global_scales = config.global_image_scales()
    rows = [level.global_descriptor for level in levels if level.scale in global_scales]
    if not rows:
        raise InputError(f"{name or 'image'}: no global descriptor: none of the global scales "
                         f"{', '.join(f'{scale:g}' for scale in global_scales)} could run (the image is too small)")
    if any(row is None for row in rows):
        raise InputError(f"{name or 'image'}: the network gave no global descriptor (not a DELG network)")
    if not all(np.isfinite(row).all() for row in rows):
        raise InputError(f"{name or 'image'}: the network gave a non-finite global descriptor (are the weights "
                         "damaged?)")
    return combine_global_descriptors(np.stack(rows))


def image_features_from_levels(levels: Sequence[PyramidLevel], config: ExtractionConfig, pca: PcaParameters | None,
                               kind: str = "delf", name: str = "") -> ImageFeatures:
    """ImageFeatures of one image from its pyramid outputs (also the 310 postprocess); `kind` is the
    network's ('delg': with its global descriptor)."""
    global_descriptor = global_descriptor_from_levels(levels, config, name) if kind == "delg" else None
    return ImageFeatures(features_from_levels(levels, config, pca, name), global_descriptor)


def extract(images: Iterable[np.ndarray], model, config: ExtractionConfig,
            pca: PcaParameters | None = None) -> list[LocalFeatures]:
    """Features of uint8 RGB images with a DelfModel in state 'test' (PCA when config.use_pca)."""
    if config.use_pca and pca is None:
        pca = load_pca(config)
    extractor = DelfExtractor(model, config, pca if config.use_pca else None)
    return [extractor(image) for image in images]


def features_settings_hash(settings: ExtractionConfig, model_id: str, pca: PcaParameters | None) -> str:
    """The settings hash stored with every image: the extraction settings, the weights (`model_id`:
    weights.checkpoint_id, or the exported model's) and the values of the PCA applied (None: none),
    so that a rerun after a PCA refit or new weights redoes every image. One per run."""
    if pca is not None:
        model_id = f"{model_id};pca={pca_digest(pca)}"
    return settings.settings_hash(model_id)


@dataclass
class ExtractionReport:
    extracted: int = 0
    skipped: int = 0  # already done with the same settings
    failed: dict[str, str] = field(default_factory=dict)  # image id -> "path: reason"

    def merge(self, other: ExtractionReport) -> None:
        self.extracted += other.extracted
        self.skipped += other.skipped
        self.failed.update(other.failed)


class PreparedImage(NamedTuple):
    """One image ready for the network, or the error that stopped its preparation."""

    image_id: str
    path: Path
    image_size: tuple[int, int] | None
    inputs: list[LevelInput] | None
    error: BaseException | None


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
_END = object()


class _Crash(NamedTuple):
    error: BaseException  # an unexpected error of the prefetch thread, raised again in the caller


def prefetched(items: Iterable[_Item], prepare: Callable[[_Item], _Result], depth: int = 1) -> Iterator[_Result]:
    """prepare(item) for every item, in order, computed by one background thread up to `depth` items
    ahead (a bounded queue, so at most `depth` results wait in memory). depth 0: no thread."""
    if depth <= 0:
        yield from map(prepare, items)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(prepare(item)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(_Crash(error))
            return
        offer(_END)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (value := ready.get()) is not _END:
            if isinstance(value, _Crash):
                raise value.error
            yield value
    finally:
        stop.set()  # the consumer stopped (done, error, or abandoned): let the thread end
        thread.join()


def extract_to_store(image_paths: Mapping[str, Path], store: FeatureStore, extractor: DelfExtractor,
                     settings_hash: str, crops: Mapping[str, Sequence[float]] | None = None,
                     progress: bool = True, progress_label: str = "extract", prefetch: int = 1) -> ExtractionReport:
    """Extract every image not yet in `store` with these settings; resumable image by image.

    `crops` maps an image id to an [x1, y1, x2, y2] box to extract from (queries of the retrieval
    protocol); locations are then relative to the crop. An image that fails is logged and
    reported; the others go on. A full disk stops the run (what is stored stays stored).
    `prefetch` images are decoded and resized ahead by a background thread while the network
    runs (0: none).
    """
    report = ExtractionReport()
    todo = {image_id: path for image_id, path in image_paths.items() if not store.is_done(image_id, settings_hash)}
    report.skipped = len(image_paths) - len(todo)

    def prepare(item: tuple[str, Path]) -> PreparedImage:
        image_id, path = item
        try:
            inputs, image_size = extractor.file_inputs(path, crops.get(image_id) if crops else None)
            return PreparedImage(image_id, path, image_size, inputs, None)
        except IMAGE_ERRORS as error:
            return PreparedImage(image_id, path, None, None, error)

    for prepared in tqdm(prefetched(todo.items(), prepare, prefetch), total=len(todo), desc=progress_label,
                         unit="image", disable=not progress):
        image_id, path = prepared.image_id, prepared.path
        try:
            if prepared.error is not None:
                raise prepared.error
            features = extractor.image_features(prepared.inputs, name=str(path))
        except IMAGE_ERRORS as error:
            # One bad image (corrupt, too large, a network failure on its sizes) must not end a long run.
            report.failed[image_id] = failure_reason(path, error)
            LOGGER.error("%s failed: %s", image_id, report.failed[image_id])
            continue
        try:
            store.put(image_id, features.local, image_size=prepared.image_size, settings_hash=settings_hash,
                      global_descriptor=features.global_descriptor, descriptor_dtype=extractor.config.descriptor_dtype)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InputError(f"no space left on device while writing {store.path}; "
                                 f"{report.extracted + report.skipped} images are safely stored; "
                                 "free space and rerun to resume") from None
            raise
        LOGGER.info("%s: %d features", image_id, len(features.local.locations))
        report.extracted += 1
    return report


def failures_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + FAILURES_SUFFIX)


def read_failures(store_path: str | Path) -> dict[str, str]:
    """The failures list beside a store: image id -> reason ({} when there is none)."""
    try:
        lines = failures_path(store_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def write_failures(store: FeatureStore, failed: Mapping[str, str], attempted: Iterable[str],
                   settings_hash: str) -> Path | None:
    """Update the list of images that failed, beside the store (one 'id<TAB>reason' a line).

    A run over part of the images (another image list, another rank's share) must not forget the
    failures of the rest: the entries of images this run `attempted` are replaced by its own
    `failed`; the others stay unless the image is now stored with `settings_hash`. Concurrent runs
    update the list one at a time. Returns the list's path, or None (and no file) when it is empty.
    """
    path = failures_path(store.path)
    attempted = set(attempted)
    with directory_lock(path.parent):
        listed = {image_id: reason for image_id, reason in read_failures(store.path).items()
                  if image_id not in attempted and not store.is_done(image_id, settings_hash)}
        listed.update(failed)
        if not listed:
            path.unlink(missing_ok=True)
            return None
        atomic_write_text(path, "".join(f"{image_id}\t{reason}\n" for image_id, reason in sorted(listed.items())))
    return path


def extract_folder(image_paths: Mapping[str, Path], store_path: str | Path, extractor: DelfExtractor,
                   settings_hash: str) -> ExtractionReport:
    """extract_to_store into a store file, then compact it and update its failures list."""
    with FeatureStore(store_path) as store:
        report = extract_to_store(image_paths, store, extractor, settings_hash)
        store.compact()  # also merges the journal of an earlier run that stopped before compacting
        write_failures(store, report.failed, image_paths, settings_hash)
    return report
