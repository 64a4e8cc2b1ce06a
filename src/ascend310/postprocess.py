"""Ascend-310 path, step 3: network outputs -> the feature store that direct extraction writes.

For every manifest of src/preprocess.py whose level outputs the runner (ascend310_infer/ or
src/infer_mindir.py) has written, the attention and block3 maps are read, cropped to the level's
own block3 size (canvas inputs hold padding bottom/right) and turned into PyramidLevels; the
keypoints then come from the same code as direct extraction (select_keypoints,
postprocess_descriptors). Features go to `<output_dir>/<store>` (features.h5, or
index_features.h5 / query_features.h5 for a retrieval data set), with the settings hash of
direct extraction, the exported model standing in for the checkpoint.

A processed image's manifest and outputs are deleted (that is what lets preprocess throttle);
the run ends when the runner's DONE marker is there and no manifest is left.

    python -m src.postprocess --work_path WORK --mindir_path DELF_MindIR.mindir --output_dir FEATURES
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from model_utils.cli import InputError, cli_main
from model_utils.config import ExtractionConfig
from model_utils.files import require_writable, require_writable_dir
from src.ascend310.preprocess import (
    DEFAULT_WAIT_TIMEOUT,
    DONE_MARKER,
    MANIFEST_FORMAT,
    MANIFESTS_DIR,
    OUTPUTS_DIR,
    POLL_INTERVAL,
)
from src.ascend310.runner import OUTPUT_SUFFIXES
from src.extraction.extractor import features_from_levels
from src.extraction.pca import PcaParameters, load_pca
from src.extraction.pyramid import PyramidLevel
from src.extraction.store import FeatureStore

LOGGER = logging.getLogger("delf.postprocess")


def read_manifest(path: Path) -> dict:
    """A preprocess manifest, checked enough that later errors cannot be cryptic."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"manifest {path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a {MANIFEST_FORMAT} manifest written by src.preprocess")
    store = str(manifest.get("store", ""))
    if not store or Path(store).name != store:
        raise InputError(f"manifest {path}: store must be a plain file name, got {store!r}")
    return manifest


def output_paths(outputs_dir: Path, level: dict) -> tuple[Path, Path]:
    stem = level["input_file"][: -len(".bin")]
    return tuple(outputs_dir / (stem + suffix) for suffix in OUTPUT_SUFFIXES)


def outputs_ready(manifest: dict, outputs_dir: Path) -> bool:
    return all(path.exists() for level in manifest["levels"] for path in output_paths(outputs_dir, level))


def read_level(level: dict, outputs_dir: Path) -> PyramidLevel:
    """The runner's maps of one level, cropped to what the level itself (not its canvas) yields."""
    from src.model.network import block3_output_size

    attention_path, features_path = output_paths(outputs_dir, level)
    _, _, input_h, input_w = level["shape"]
    map_h, map_w = block3_output_size(input_h), block3_output_size(input_w)
    attention = np.fromfile(attention_path, dtype=np.float32)
    features = np.fromfile(features_path, dtype=np.float32)
    if attention.size != map_h * map_w or features.size == 0 or features.size % (map_h * map_w):
        raise InputError(f"{attention_path.name} / {features_path.name}: {attention.size} and {features.size} "
                         f"values do not form {map_h}x{map_w} maps for a {input_h}x{input_w} input")
    # Canvas levels sit top-left (place_on_canvas keeps maps aligned there); the rest is padding.
    valid_h, valid_w = (block3_output_size(side) for side in level["size"])
    return PyramidLevel(
        float(level["scale"]),
        tuple(float(v) for v in level["scale_yx"]),
        attention.reshape(map_h, map_w)[:valid_h, :valid_w],
        features.reshape(-1, map_h, map_w)[:, :valid_h, :valid_w],
    )


def postprocess(work_dir: str | Path, output_dir: str | Path, config: ExtractionConfig, model_id: str,
                pca: PcaParameters | None = None, keep_outputs: bool = False,
                wait_timeout: float = DEFAULT_WAIT_TIMEOUT, progress: bool = True) -> int:
    """Store the features of every image of the run in `work_dir`; returns the number of images."""
    from tqdm import tqdm

    work_dir, output_dir = Path(work_dir), Path(output_dir)
    manifests_dir, outputs_dir = work_dir / MANIFESTS_DIR, work_dir / OUTPUTS_DIR
    if config.use_pca and pca is None:
        pca = load_pca(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    count, idle_since = 0, time.monotonic()
    with contextlib.ExitStack() as stack, tqdm(desc="postprocess", unit="image", disable=not progress) as bar:
        stores: dict[str, FeatureStore] = {}
        while True:
            manifest_paths = sorted(manifests_dir.glob("*.json"))
            ready = [(path, manifest) for path, manifest in ((p, read_manifest(p)) for p in manifest_paths)
                     if outputs_ready(manifest, outputs_dir)]
            for path, manifest in ready:
                levels = [read_level(level, outputs_dir) for level in manifest["levels"]]
                features = features_from_levels(levels, config, pca, manifest["image_id"])
                if manifest["store"] not in stores:
                    stores[manifest["store"]] = stack.enter_context(FeatureStore(output_dir / manifest["store"]))
                settings_hash = config.settings_hash(f"{model_id};input={manifest['input_mode']}")
                stores[manifest["store"]].put(manifest["image_id"], features,
                                              image_size=tuple(manifest["image_size"]), settings_hash=settings_hash)
                LOGGER.info("%s: %d features", manifest["image_id"], len(features.locations))
                path.unlink()  # first: a leftover output file only costs disk, a leftover manifest a rerun
                if not keep_outputs:
                    for level in manifest["levels"]:
                        for output in output_paths(outputs_dir, level):
                            output.unlink()
                count += 1
                bar.update()
            if ready:
                idle_since = time.monotonic()
                continue
            if (outputs_dir / DONE_MARKER).exists():
                left = sorted(manifests_dir.glob("*.json"))
                if not left:
                    break
                if not any(outputs_ready(read_manifest(p), outputs_dir) for p in left):
                    raise InputError(f"the runner has finished but the outputs of {len(left)} images are missing "
                                     f"from {outputs_dir} (first: manifest {left[0]}); see the runner's log")
            elif time.monotonic() - idle_since > wait_timeout:
                raise InputError(f"no runner output in {outputs_dir} for {wait_timeout:g} s and no {DONE_MARKER} "
                                 "marker: are src.preprocess and the runner (ascend310_infer/out/main or "
                                 "src.infer_mindir) running on this work directory?")
            time.sleep(POLL_INTERVAL)
    return count


@cli_main
def main(argv: list[str] | None = None) -> None:
    from model_utils.config import get_config_and_args
    from src.ascend310.runner import model_id

    parser = argparse.ArgumentParser(description="Turn the runner's DELF network outputs into a feature store "
                                     "(keypoint selection, NMS, PCA as in direct extraction).")
    parser.add_argument("--work_path", required=True, help="the preprocess work directory")
    parser.add_argument("--mindir_path", required=True, help="the MindIR the runner used (identifies the weights)")
    parser.add_argument("--output_dir", required=True, help="directory of the feature store(s)")
    parser.add_argument("--keep_outputs", action="store_true", help="keep the runner's output files")
    parser.add_argument("--log_path", default="", help="log file of per-image feature counts ('' for none)")
    parser.add_argument("--wait_timeout", type=float, default=DEFAULT_WAIT_TIMEOUT,
                        help="seconds to wait for runner output before giving up")
    config, args = get_config_and_args(argv, parser)
    from model_utils.cli import setup_logging

    require_writable_dir(args.output_dir)
    if args.log_path:
        require_writable(args.log_path, "log file")
    setup_logging(args.log_path or None)
    count = postprocess(args.work_path, args.output_dir, config.extraction, model_id(args.mindir_path),
                        keep_outputs=args.keep_outputs, wait_timeout=args.wait_timeout)
    print(f"{count} images -> {args.output_dir}")


if __name__ == "__main__":
    main()
