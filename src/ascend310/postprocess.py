"""Ascend-310 path, step 3: the runner's outputs -> the feature store that direct extraction writes.

For every image of the manifest (src/ascend310/protocol.py) the attention and local-descriptor
maps of its levels (and DELG's raw global descriptor) are read, the maps cropped to the level's
own block3 size (canvas inputs hold padding bottom/right), and turned into PyramidLevels; the
keypoints and the global descriptor then come from the code of direct extraction
(image_features_from_levels). Features are stored with the settings hash of direct extraction,
the exported model standing in for the checkpoint. An image that preprocess could not prepare,
that the runner failed on or whose outputs are unusable is reported, never stored.
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
    OUTPUT_COUNTS,
    OUTPUTS_DIR,
    clear_work_dir,
    output_paths,
    parse_input_name,
    read_manifest,
)
from src.extraction.extractor import (
    ExtractionReport,
    ImageFeatures,
    check_model_settings,
    features_settings_hash,
    image_features_from_levels,
    write_failures,
)
from src.extraction.images import failure_reason
from src.extraction.pca import PcaParameters, load_pca
from src.extraction.pyramid import PyramidLevel
from src.extraction.store import FeatureStore
from src.model.network import NetworkSpec, block3_output_size

LOGGER = logging.getLogger("delf.postprocess")
DELF_KERAS = NetworkSpec()  # what exports that predate the network record hold


def settings_hash(config: ExtractionConfig, model_id: str, input_mode: str, pca: PcaParameters | None) -> str:
    """The store's settings hash: as direct extraction's (extraction settings, PCA values), with the
    exported weights and the input mode."""
    return features_settings_hash(config, f"{model_id};input={input_mode}", pca)


def check_run(network: NetworkSpec, config: ExtractionConfig, input_mode: str) -> None:
    """InputError (one line) when inputs of `input_mode` or these extraction settings do not suit the
    exported network (checked before any image is prepared)."""
    if input_mode != "exact" and (network.backbone != "keras" or network.kind == "delg"):
        reason = ("its global descriptor pools the whole map, padding included" if network.kind == "delg"
                  else "canvas inputs need a Keras-layout export")
        raise InputError(f"{input_mode} inputs do not suit this {network.kind} model ({network.backbone} backbone): "
                         f"{reason}; use exact inputs (src.preprocess without --input_mode canvas)")
    check_model_settings(network.kind, config, "the exported network")


def read_level(level: dict, outputs_dir: Path, network: NetworkSpec = DELF_KERAS) -> PyramidLevel:
    """The runner's outputs of one level, the maps cropped to what the level itself (not its canvas) yields."""
    paths = output_paths(outputs_dir, level["input_file"], OUTPUT_COUNTS[network.kind])
    _, input_h, input_w = parse_input_name(level["input_file"])
    map_h, map_w = (block3_output_size(side, network.backbone) for side in (input_h, input_w))
    attention, features, *global_row = (np.fromfile(path, dtype=np.float32) for path in paths)
    if attention.size != map_h * map_w or features.size == 0 or features.size % (map_h * map_w):
        raise InputError(f"{paths[0].name} / {paths[1].name}: {attention.size} and {features.size} "
                         f"values do not form {map_h}x{map_w} maps for a {input_h}x{input_w} input")
    if global_row and global_row[0].size == 0:
        raise InputError(f"{paths[2].name}: empty (no global descriptor)")
    # Canvas levels sit top-left (place_on_canvas keeps maps aligned there); the rest is padding.
    valid_h, valid_w = (block3_output_size(side, network.backbone) for side in level["size"])
    return PyramidLevel(
        float(level["scale"]),
        tuple(float(v) for v in level["scale_yx"]),
        attention.reshape(map_h, map_w)[:valid_h, :valid_w],
        features.reshape(-1, map_h, map_w)[:, :valid_h, :valid_w],
        global_descriptor=global_row[0] if global_row else None,
        resize_yx=tuple(float(v) for v in level["resize_yx"]),
    )


def image_features(image: dict, outputs_dir: Path, config: ExtractionConfig, pca: PcaParameters | None,
                   runner_failures: Mapping[str, str], network: NetworkSpec = DELF_KERAS) -> ImageFeatures:
    """Features of one manifest entry; InputError when preprocess or the runner failed on it."""
    if "error" in image:
        raise InputError(image["error"])
    for level in image["levels"]:
        paths = output_paths(outputs_dir, level["input_file"], OUTPUT_COUNTS[network.kind])
        missing = [path.name for path in paths if not path.exists()]
        if missing:
            what = "outputs" if len(missing) == len(paths) else f"{missing[0]} ({network.kind}: {len(paths)} outputs)"
            raise InputError(runner_failures.get(level["input_file"])
                             or f"{level['input_file']}: the runner wrote no {what} (see its log)")
    levels = [read_level(level, outputs_dir, network) for level in image["levels"]]
    return image_features_from_levels(levels, config, pca, network.kind, image["path"])


def store_outputs(manifest: dict, outputs_dir: Path, stores: Mapping[str, FeatureStore], config: ExtractionConfig,
                  pca: PcaParameters | None, model_id: str,
                  runner_failures: Mapping[str, str] | None = None, network: NetworkSpec = DELF_KERAS
                  ) -> dict[str, ExtractionReport]:
    """Store the features of every image of `manifest`; returns a report per store name.

    `network` is what the export records (src.model.export.exported_network): its backbone layout
    fixes the size of the maps of every input size, its kind the outputs."""
    check_run(network, config, manifest["input_mode"])
    run_hash = settings_hash(config, model_id, manifest["input_mode"], pca)
    reports = {name: ExtractionReport() for name in stores}
    for image in manifest["images"]:
        report = reports[image["store"]]
        try:
            features = image_features(image, outputs_dir, config, pca, runner_failures or {}, network)
        except (InputError, MemoryError, ValueError) as error:
            report.failed[image["image_id"]] = failure_reason(image["path"], error)
            LOGGER.error("%s failed: %s", image["image_id"], report.failed[image["image_id"]])
            continue
        stores[image["store"]].put(image["image_id"], features.local, image_size=tuple(image["image_size"]),
                                   settings_hash=run_hash, global_descriptor=features.global_descriptor,
                                   descriptor_dtype=config.descriptor_dtype)
        LOGGER.info("%s: %d features", image["image_id"], len(features.local.locations))
        report.extracted += 1
    return reports


def postprocess(work_dir: str | Path, output_dir: str | Path, config: ExtractionConfig, model_id: str,
                pca: PcaParameters | None = None, keep_outputs: bool = False, network: NetworkSpec = DELF_KERAS
                ) -> dict[str, ExtractionReport]:
    """Store the run in `work_dir` into `<output_dir>/<store>` and list its failures beside each store."""
    manifest = read_manifest(work_dir)
    check_run(network, config, manifest["input_mode"])
    if config.use_pca and pca is None:
        pca = load_pca(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stores = {name: stack.enter_context(FeatureStore(output_dir / name))
                  for name in sorted({image["store"] for image in manifest["images"]})}
        reports = store_outputs(manifest, Path(work_dir) / OUTPUTS_DIR, stores, config, pca, model_id,
                                network=network)
        run_hash = settings_hash(config, model_id, manifest["input_mode"], pca)
        for name, report in reports.items():
            write_failures(stores[name], report.failed,
                           [image["image_id"] for image in manifest["images"] if image["store"] == name], run_hash)
    if not keep_outputs:
        clear_work_dir(work_dir)
    return reports
