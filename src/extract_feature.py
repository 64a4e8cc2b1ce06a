"""Multi-scale DELF feature extraction: image -> pyramid -> DelfModel -> keypoints -> PCA.

Each pyramid level runs at its own size (no fixed 2048x2048 canvas). The output of every image
is a `LocalFeatures`: locations (N, 2) as (y, x) in original-image pixels, descriptors (N, 40),
scales (N,) = 1 / pyramid scale, attention (N,).

    python -m src.extract_feature --images_path DIR --ckpt_path delf.ckpt --output_path features.h5
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python src/extract_feature.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.delf_config import ExtractionConfig  # noqa: E402
from src.errors import InputError, cli_main  # noqa: E402
from src.extract_utils_np import (  # noqa: E402
    PcaParameters,
    PyramidLevel,
    load_pca,
    postprocess_descriptors,
    select_keypoints,
)
from src.feature_io import FeatureStore, LocalFeatures  # noqa: E402
from src.image_io import crop_to_box, find_images, load_image, resize_image  # noqa: E402

LOGGER = logging.getLogger("delf.extract")
MIN_IMAGE_SIDE = 10  # smaller images give no features (as the TF reference)


def fit_image_size(height: int, width: int, config: ExtractionConfig, name: str = "") -> float:
    """Factor applied before the pyramid: max/min_image_size, then the per-level memory bound."""
    factor = 1.0
    largest = max(height, width)
    if 0 < config.max_image_size < largest:
        factor = config.max_image_size / largest
    elif 0 < largest < config.min_image_size:
        factor = config.min_image_size / largest
    top_scale = max(config.image_scales)
    level_pixels = height * width * (factor * top_scale) ** 2
    if level_pixels > config.max_pixels_per_scale:
        factor *= (config.max_pixels_per_scale / level_pixels) ** 0.5
        LOGGER.warning("%s: %dx%d is too large for pyramid scale %g (more than %d pixels); "
                       "downscaled by %.3f", name or "image", width, height, top_scale,
                       config.max_pixels_per_scale, factor)
    return factor


def empty_features(depth: int) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                         np.zeros((0, depth), np.float32), np.zeros(0, np.float32))


class DelfExtractor:
    """Runs the network over the pyramid of one image and turns the maps into LocalFeatures."""

    def __init__(self, model, config: ExtractionConfig, pca: PcaParameters | None = None) -> None:
        from mindspore import Tensor

        self._tensor = Tensor
        self.model = model
        self.model.set_train(False)
        self.config = config
        self.pca = pca
        self.output_depth = config.pca_dim if pca is not None else config.feature_depth

    def pyramid(self, image: np.ndarray, name: str = "") -> list[PyramidLevel]:
        """Attention and block3 maps of every scale; locations refer to `image`'s pixels."""
        from src.delf_model import normalize_images

        height, width = image.shape[:2]
        factor = fit_image_size(height, width, self.config, name)
        levels = []
        for scale in self.config.image_scales:
            level_h = int(round(height * factor * scale))
            level_w = int(round(width * factor * scale))
            if min(level_h, level_w) < 1:
                continue
            level_image = resize_image(image, level_h, level_w)
            attention, features = self.model(self._tensor(normalize_images(level_image[None])))
            levels.append(PyramidLevel(scale, (level_h / height, level_w / width),
                                       attention.asnumpy()[0, 0], features.asnumpy()[0]))
        return levels

    def __call__(self, image: np.ndarray, name: str = "") -> LocalFeatures:
        if min(image.shape[:2]) < MIN_IMAGE_SIDE:
            LOGGER.warning("%s: %dx%d is under %d px; no features", name or "image",
                           image.shape[1], image.shape[0], MIN_IMAGE_SIDE)
            return empty_features(self.output_depth)
        return features_from_levels(self.pyramid(image, name), self.config, self.pca, name)


def features_from_levels(levels: Sequence[PyramidLevel], config: ExtractionConfig, pca: PcaParameters | None,
                         name: str = "") -> LocalFeatures:
    """Keypoints and final descriptors of one image from its pyramid maps (also the 310 postprocess)."""
    if not levels:  # an image under MIN_IMAGE_SIDE
        return empty_features(config.pca_dim if pca is not None else config.feature_depth)
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


def extract_to_store(image_paths: dict[str, Path], store: FeatureStore, extractor: DelfExtractor,
                     settings_hash: str, crops: dict[str, Sequence[float]] | None = None,
                     progress: bool = True, progress_label: str = "extract") -> dict[str, int]:
    """Extract every image not yet in `store` with these settings; resumable image by image.

    `crops` maps an image id to an [x1, y1, x2, y2] box to extract from (queries of the retrieval
    protocol); locations are then relative to the crop.
    """
    from tqdm import tqdm

    counts = {"extracted": 0, "skipped": 0}
    todo = {image_id: path for image_id, path in image_paths.items() if not store.is_done(image_id, settings_hash)}
    counts["skipped"] = len(image_paths) - len(todo)
    for image_id, path in tqdm(todo.items(), desc=progress_label, unit="image", disable=not progress):
        image = load_image(path)
        if crops and image_id in crops:
            image = crop_to_box(image, crops[image_id])
        features = extractor(image, name=str(path))
        store.put(image_id, features, image_size=image.shape[:2], settings_hash=settings_hash)
        LOGGER.info("%s: %d features", image_id, len(features.locations))
        counts["extracted"] += 1
    return counts


def checkpoint_id(ckpt_path: str) -> str:
    """Identifies the weights in the settings hash: path, size and modification time."""
    if not ckpt_path:
        return "untrained"
    stat = Path(ckpt_path).stat()
    return f"{Path(ckpt_path).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def load_extraction_model(ckpt_path: str, device_target: str, conv_impl: str, bn_epsilon: float,
                          use_autoencoder: bool, autoencoder_dim: int, seed: int = 0):
    """The 'test' network with trained weights, or seeded random weights (with a warning)."""
    import mindspore

    from src.delf_model import build_model, resolve_conv_impl

    if ckpt_path and not Path(ckpt_path).is_file():
        raise InputError(f"checkpoint not found: {ckpt_path}")
    if not ckpt_path:
        LOGGER.warning("no checkpoint given: running on UNTRAINED (random, seed %d) weights", seed)
    mindspore.set_seed(seed)
    return build_model("test", weights_path=ckpt_path, bn_epsilon=bn_epsilon,
                       conv_impl=resolve_conv_impl(conv_impl, device_target),
                       use_autoencoder=use_autoencoder, autoencoder_dim=autoencoder_dim,
                       required_prefixes=("backbone.", "attention."))


def setup_logging(log_path: str | None = None) -> None:
    """INFO to a log file (when given), warnings and up to the terminal."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers[0].setLevel(logging.WARNING)
    if log_path:
        file_handler = logging.FileHandler(log_path)
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


@cli_main
def main(argv: list[str] | None = None) -> None:
    from model_utils.config import get_config_and_args
    from model_utils.device import setup_device

    parser = argparse.ArgumentParser(description="Extract DELF features of a folder of images into an HDF5 store.")
    parser.add_argument("--images_path", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output_path", required=True, help="feature store (.h5) to create or resume")
    parser.add_argument("--ckpt_path", default="", help="DELF checkpoint (empty: untrained weights)")
    parser.add_argument("--list_images_path", default="", help="only the image names listed in this file")
    parser.add_argument("--log_path", default="extract_feature.log", help="log file ('' for none)")
    config, args = get_config_and_args(argv, parser)
    setup_logging(args.log_path)
    names = None
    if args.list_images_path:
        from src.match_images import read_image_pair_list

        names = list(read_image_pair_list(args.list_images_path))
    image_paths = find_images(args.images_path, names)
    # Graph mode compiles once per input shape (4-17 s on CPU), then runs 3-5x faster than
    # PyNative: right for data sets with few distinct image sizes, wrong for a handful of images.
    target = setup_device(config.device_target, config.device_id, graph_mode=config.mode == "graph")
    model = load_extraction_model(args.ckpt_path, target, config.conv_impl, config.bn_epsilon,
                                  config.use_autoencoder, config.autoencoder_dim, config.seed)
    settings = config.extraction
    pca = load_pca(settings) if settings.use_pca else None
    extractor = DelfExtractor(model, settings, pca)
    with FeatureStore(args.output_path) as store:
        counts = extract_to_store(image_paths, store, extractor, settings.settings_hash(checkpoint_id(args.ckpt_path)))
    print(f"{counts['extracted']} images extracted, {counts['skipped']} already done -> {args.output_path}")


if __name__ == "__main__":
    main()
