"""Ascend-310 path, step 3: the runner's outputs -> the feature store that direct extraction writes.

For every image of the manifest (src/ascend310/protocol.py) the attention and block3 maps of its
levels are read, cropped to the level's own block3 size (canvas inputs hold padding bottom/right)
and turned into PyramidLevels; the keypoints then come from the code of direct extraction
(features_from_levels). Features are stored with the settings hash of direct extraction, the
exported model standing in for the checkpoint. An image that preprocess could not prepare, that
the runner failed on or whose outputs are unusable is reported, never stored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.ascend310.protocol import (
    OUTPUTS_DIR,
    clear_work_dir,
    output_paths,
    parse_input_name,
    read_manifest,
)
from src.extraction.extractor import ExtractionReport, features_from_levels, features_settings_hash, write_failures
from src.extraction.features import LocalFeatures
from src.extraction.images import failure_reason
from src.extraction.pca import PcaParameters, load_pca
from src.extraction.pyramid import PyramidLevel
from src.extraction.store import FeatureStore
from src.model.network import block3_output_size

LOGGER = logging.getLogger("delf.postprocess")


def settings_hash(config: ExtractionConfig, model_id: str, input_mode: str, pca: PcaParameters | None) -> str:
    """The store's settings hash: as direct extraction's (extraction settings, PCA values), with the
    exported weights and the input mode."""
    return features_settings_hash(config, f"{model_id};input={input_mode}", pca)


def read_level(level: dict, outputs_dir: Path, backbone: str = "keras") -> PyramidLevel:
    """The runner's maps of one level, cropped to what the level itself (not its canvas) yields."""
    attention_path, features_path = output_paths(outputs_dir, level["input_file"])
    _, input_h, input_w = parse_input_name(level["input_file"])
    map_h, map_w = block3_output_size(input_h, backbone), block3_output_size(input_w, backbone)
    attention = np.fromfile(attention_path, dtype=np.float32)
    features = np.fromfile(features_path, dtype=np.float32)
    if attention.size != map_h * map_w or features.size == 0 or features.size % (map_h * map_w):
        raise InputError(f"{attention_path.name} / {features_path.name}: {attention.size} and {features.size} "
                         f"values do not form {map_h}x{map_w} maps for a {input_h}x{input_w} input")
    # Canvas levels sit top-left (place_on_canvas keeps maps aligned there); the rest is padding.
    valid_h, valid_w = (block3_output_size(side, backbone) for side in level["size"])
    return PyramidLevel(
        float(level["scale"]),
        tuple(float(v) for v in level["scale_yx"]),
        attention.reshape(map_h, map_w)[:valid_h, :valid_w],
        features.reshape(-1, map_h, map_w)[:, :valid_h, :valid_w],
    )


def image_features(image: dict, outputs_dir: Path, config: ExtractionConfig, pca: PcaParameters | None,
                   runner_failures: Mapping[str, str], backbone: str = "keras") -> LocalFeatures:
    """Features of one manifest entry; InputError when preprocess or the runner failed on it."""
    if "error" in image:
        raise InputError(image["error"])
    for level in image["levels"]:
        if not all(path.exists() for path in output_paths(outputs_dir, level["input_file"])):
            raise InputError(runner_failures.get(level["input_file"])
                             or f"{level['input_file']}: the runner wrote no outputs (see its log)")
    levels = [read_level(level, outputs_dir, backbone) for level in image["levels"]]
    return features_from_levels(levels, config, pca, image["path"])


def store_outputs(manifest: dict, outputs_dir: Path, stores: Mapping[str, FeatureStore], config: ExtractionConfig,
                  pca: PcaParameters | None, model_id: str,
                  runner_failures: Mapping[str, str] | None = None, backbone: str = "keras"
                  ) -> dict[str, ExtractionReport]:
    """Store the features of every image of `manifest`; returns a report per store name.

    `backbone` is the exported network's layout (src.model.export.exported_backbone): it fixes the
    size of the maps of every input size."""
    if backbone != "keras" and manifest["input_mode"] != "exact":
        raise InputError(f"{manifest['input_mode']} inputs need a Keras-layout export; this {backbone} model "
                         "takes exact inputs (src.preprocess without --input_mode canvas)")
    run_hash = settings_hash(config, model_id, manifest["input_mode"], pca)
    reports = {name: ExtractionReport() for name in stores}
    for image in manifest["images"]:
        report = reports[image["store"]]
        try:
            features = image_features(image, outputs_dir, config, pca, runner_failures or {}, backbone)
        except (InputError, MemoryError, ValueError) as error:
            report.failed[image["image_id"]] = failure_reason(image["path"], error)
            LOGGER.error("%s failed: %s", image["image_id"], report.failed[image["image_id"]])
            continue
        stores[image["store"]].put(image["image_id"], features, image_size=tuple(image["image_size"]),
                                   settings_hash=run_hash, descriptor_dtype=config.descriptor_dtype)
        LOGGER.info("%s: %d features", image["image_id"], len(features.locations))
        report.extracted += 1
    return reports


def postprocess(work_dir: str | Path, output_dir: str | Path, config: ExtractionConfig, model_id: str,
                pca: PcaParameters | None = None, keep_outputs: bool = False, backbone: str = "keras"
                ) -> dict[str, ExtractionReport]:
    """Store the run in `work_dir` into `<output_dir>/<store>` and list its failures beside each store."""
    manifest = read_manifest(work_dir)
    if config.use_pca and pca is None:
        pca = load_pca(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stores = {name: stack.enter_context(FeatureStore(output_dir / name))
                  for name in sorted({image["store"] for image in manifest["images"]})}
        reports = store_outputs(manifest, Path(work_dir) / OUTPUTS_DIR, stores, config, pca, model_id,
                                backbone=backbone)
        run_hash = settings_hash(config, model_id, manifest["input_mode"], pca)
        for name, report in reports.items():
            write_failures(stores[name], report.failed,
                           [image["image_id"] for image in manifest["images"] if image["store"] == name], run_hash)
    if not keep_outputs:
        clear_work_dir(work_dir)
    return reports
