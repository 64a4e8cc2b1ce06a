"""Benchmark: DELG extraction time per image against DELF extraction, alternated in one process.

Both extract the same real photos (../shared/data/images, fitted into --max-side) through
DelfExtractor.image_features with the same 7-scale pyramid, 1000 keypoints by attention:
  - DELF: DelfModel "test" (ResNet50 to block3 + attention), 1024-D descriptors PCA-projected to 40-D;
  - DELG: DelgModel "test" (ResNet50 with block4 + GeM + whitening, autoencoder + attention), the
    128-D autoencoder code without PCA, and the global descriptor from scales 0.7071, 1, 1.4142 (the
    same single pass over the pyramid).
Seeded random weights (extraction costs the same for any weights). The two take turns image by
image, and the order flips every round, so a noisy machine hits both alike; the level inputs of an
image are made once and given to both (decoding and resizing are the same work for both and not
timed). The first image of each model (where graph mode compiles) is reported apart. Printed:
median seconds per image of each, and the DELG / DELF ratio of every image pair and their median.

    python bench/delg_extract.py [--images 6] [--rounds 2] [--max-side 512] [--mode graph|pynative]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "images"
SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def extractors(mode: str, max_side: int) -> dict:
    """{"DELF": extractor, "DELG": extractor} with seeded random weights."""
    import mindspore
    import numpy as np

    from model_utils.config import ExtractionConfig
    from model_utils.device import setup_device
    from src.extraction.extractor import DelfExtractor
    from src.extraction.pca import PcaParameters
    from src.model.batchnorm_folding import fold_batchnorms
    from src.model.delg import DelgModel
    from src.model.network import DelfModel

    def as_extraction_builds_it(model):  # build_extraction_model: inference mode, BatchNorms folded
        model.set_train(False)
        fold_batchnorms(model)
        return model

    setup_device("CPU", graph_mode=mode == "graph")
    mindspore.set_seed(0)
    common = dict(image_scales=SCALES, max_image_size=max_side, score_threshold=0.0, max_feature_num=1000)
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((1024, 1024)))[0]
    delf = DelfExtractor(as_extraction_builds_it(DelfModel("test")), ExtractionConfig(**common, pca_dim=40),
                         PcaParameters(np.zeros(1024), rotation, None))
    delg_settings = ExtractionConfig(**common, use_pca=False, feature_depth=128, global_scale_indices=(3, 4, 5))
    delg = DelfExtractor(as_extraction_builds_it(DelgModel("test")), delg_settings)
    return {"DELF": delf, "DELG": delg}


def photos(count: int) -> list[Path]:
    found = sorted(path for path in PHOTOS.glob("*.jpg"))
    if not found:
        raise SystemExit(f"no photos in {PHOTOS} (python tests/fetch_test_data.py fetches them)")
    return [found[index % len(found)] for index in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="photos per round (after the first, untimed pair)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the photos (the order flips each round)")
    parser.add_argument("--max-side", type=int, default=512, help="extraction.max_image_size (TF's DELG preset: 1024)")
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph", help="MindSpore mode")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from src.extraction.images import load_image

    models = extractors(args.mode, args.max_side)
    names = list(models)
    warm_up = {}
    first_inputs = models["DELF"].inputs(load_image(photos(1)[0]))
    for name in names:
        started = time.perf_counter()
        models[name].image_features(first_inputs)
        warm_up[name] = time.perf_counter() - started

    seconds = {name: [] for name in names}
    ratios = []
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for path in photos(args.images + 1)[1:]:
            inputs = models["DELF"].inputs(load_image(path), path.name)  # the same levels for both
            pair = {}
            for name in order:
                started = time.perf_counter()
                features = models[name].image_features(inputs)
                pair[name] = time.perf_counter() - started
                assert (features.global_descriptor is not None) == (name == "DELG")
                seconds[name].append(pair[name])
            ratios.append(pair["DELG"] / pair["DELF"])

    pixels = sum(level.image.shape[2] * level.image.shape[3] for level in first_inputs)
    print(f"DELG vs DELF extraction, {args.mode} mode, {len(SCALES)} scales, max_image_size {args.max_side} "
          f"({pixels / 1e6:.2f} Mpixel of levels for the first photo), 1000 keypoints; {os.cpu_count()} threads; "
          f"{args.rounds} rounds x {args.images} photos, alternated")
    print(f"{'model':6s} {'first image s':>14s} {'median s/image':>15s} {'min s/image':>12s}")
    for name in names:
        print(f"{name:6s} {warm_up[name]:14.2f} {statistics.median(seconds[name]):15.3f} {min(seconds[name]):12.3f}")
    print(f"DELG / DELF time per image: median {statistics.median(ratios):.3f} "
          f"(pairs: min {min(ratios):.3f}, max {max(ratios):.3f}, n {len(ratios)})")


if __name__ == "__main__":
    main()
