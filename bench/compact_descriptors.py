"""Compact local descriptors in the feature store (extraction.descriptor_dtype): their effect on
RANSAC inliers of real photo pairs, and the disk and memory figures of DELG's R1M re-ranking.

1. Inliers: DELG-shaped local features (the 128-D autoencoder code, L2-normalised, no PCA) of
   four real photo pairs (../shared/data/images), extracted with seeded random weights (no trained
   DELG weights exist offline), stored in a FeatureStore as float32, float16 and int8, read back
   (`keypoints`, decoded to float32 as re-ranking reads them) and verified with DELG's matching
   settings (nearest neighbours within distance 1.0, affine RANSAC 20 px, 1000 trials), then
   again with the distance threshold at the median nearest-neighbour distance of the float32
   pair, where half the features are putative matches and an encoding error can flip a match.
   Prints per pair and encoding the inliers and their difference to float32 (median and worst),
   beside RANSAC's own variation: float32 with another RANSAC seed.
2. Disk and memory: a store of --images synthetic images of DELG's size (1000 features x 128-D,
   one 2048-D global descriptor) is written in each encoding; bytes per image of the compacted
   HDF5 file and the keypoint read + decode time per image (encodings alternated) are measured;
   the R1M figures (1M images) are extrapolated from the bytes: the store on disk, and the
   memory re-ranking needs (the shortlisted and cached images' keypoints, decoded to float32).

    python bench/compact_descriptors.py [--images 200] [--scales 0.5 0.7071 1.0] [--max_image_size 640]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.extraction.features import DESCRIPTOR_DTYPES, LocalFeatures  # noqa: E402
from src.extraction.store import FeatureStore  # noqa: E402
from src.matching.verify import match_features  # noqa: E402
from src.retrieval.rerank import FEATURE_CACHE_IMAGES  # noqa: E402

PAIRS = [("sacre_coeur1.jpg", "sacre_coeur2.jpg"), ("leuvenA.jpg", "leuvenB.jpg"),
         ("box.png", "box_in_scene.png"), ("all_souls_000013.jpg", "all_souls_000055.jpg")]
IMAGES_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"
DELG = {"distance_threshold": 1.0, "residual_threshold": 20.0, "max_trials": 1000}
NUM_FEATURES, LOCAL_DIM, GLOBAL_DIM = 1000, 128, 2048
ONE_MILLION = 1_000_000
SHORTLIST = 100


def extract_pairs(scales: list[float], max_image_size: int) -> list[tuple[str, LocalFeatures, LocalFeatures]]:
    """DELG-shaped local features of each pair with a seeded random DelfModel (autoencoder on)."""
    from model_utils.device import setup_device

    setup_device("CPU", graph_mode=False)
    import mindspore

    from model_utils.config import ExtractionConfig
    from src.extraction.extractor import extract
    from src.extraction.images import load_image
    from src.model.network import DelfModel

    mindspore.set_seed(0)
    model = DelfModel("test", use_autoencoder=True, autoencoder_dim=LOCAL_DIM)
    # Random weights score attention low: keep every cell (score_threshold 0), up to 1000.
    config = ExtractionConfig(image_scales=tuple(scales), score_threshold=0.0, use_pca=False,
                              max_image_size=max_image_size, max_feature_num=NUM_FEATURES)
    pairs = []
    for first, second in PAIRS:
        started = time.perf_counter()
        features = extract([load_image(IMAGES_DIR / first), load_image(IMAGES_DIR / second)], model, config)
        print(f"  extracted {first} / {second}: {len(features[0].locations)} + {len(features[1].locations)} "
              f"features x {features[0].descriptors.shape[1]}-D in {time.perf_counter() - started:.0f} s", flush=True)
        pairs.append((f"{first[:-4]}/{second[:-4]}", *features))
    return pairs


def stored_copies(work_dir: Path, name: str, features: LocalFeatures) -> dict[str, LocalFeatures]:
    """`features` put into a store in each encoding and read back as re-ranking reads them."""
    copies = {}
    for dtype in DESCRIPTOR_DTYPES:
        with FeatureStore(work_dir / f"pairs_{dtype}.h5") as store:
            store.put(name, features, image_size=(1, 1), settings_hash=dtype, descriptor_dtype=dtype)
            keypoints = store.keypoints(name)
        copies[dtype] = features._replace(descriptors=keypoints.descriptors)
    return copies


def median_nn_distance(features_1: LocalFeatures, features_2: LocalFeatures) -> float:
    products = features_1.descriptors @ features_2.descriptors.T
    return float(np.median(np.sqrt(np.maximum(2.0 - 2.0 * products.max(axis=1), 0.0))))


def measure_inliers(pairs, work_dir: Path) -> None:
    print(f"\n{'pair':>40} {'threshold':>15} " + " ".join(f"{dtype:>14}" for dtype in DESCRIPTOR_DTYPES)
          + f" {'float32 seed 1':>14}   (inliers / putative)")
    # The baseline of the differences: float32 with another RANSAC seed (RANSAC's own variation).
    differences: dict[str, list[int]] = {dtype: [] for dtype in (*DESCRIPTOR_DTYPES[1:], "float32 seed 1")}
    for name, features_1, features_2 in pairs:
        copies_1 = stored_copies(work_dir, name.replace("/", "_") + "_1", features_1)
        copies_2 = stored_copies(work_dir, name.replace("/", "_") + "_2", features_2)
        error = max(float(np.abs(copies_1[d].descriptors - features_1.descriptors).max()) for d in DESCRIPTOR_DTYPES)
        for label, threshold in (("DELG 1.0", 1.0), ("median NN", median_nn_distance(features_1, features_2))):
            settings = {**DELG, "distance_threshold": threshold}
            results = {dtype: match_features(copies_1[dtype], copies_2[dtype], **settings)
                       for dtype in DESCRIPTOR_DTYPES}
            results["float32 seed 1"] = match_features(copies_1["float32"], copies_2["float32"], seed=1, **settings)
            for dtype in differences:
                differences[dtype].append(results[dtype].num_inliers - results["float32"].num_inliers)
            cells = " ".join(f"{f'{r.num_inliers} / {r.num_putative}':>14}" for r in results.values())
            print(f"{name:>40} {label + (f' {threshold:.3f}' if label != 'DELG 1.0' else ''):>15} {cells}")
        print(f"{'':>40} largest descriptor value error over the encodings: {error:.2e}")
    print()
    for dtype, values in differences.items():
        absolute = [abs(v) for v in values]
        print(f"{dtype} vs float32 (seed 0) over {len(values)} pair/threshold cases: inlier difference median "
              f"{statistics.median(values):+.1f}, worst {max(absolute)} "
              f"(differences {sorted(values)})")


def synthetic_image(rng: np.random.Generator) -> tuple[LocalFeatures, np.ndarray]:
    descriptors = rng.standard_normal((NUM_FEATURES, LOCAL_DIM), dtype=np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    features = LocalFeatures(rng.uniform(0, 1024, (NUM_FEATURES, 2)).astype(np.float32),
                             rng.choice([0.5, 1.0, 2.0], NUM_FEATURES).astype(np.float32), descriptors,
                             rng.uniform(100, 900, NUM_FEATURES).astype(np.float32))
    global_descriptor = rng.standard_normal(GLOBAL_DIM, dtype=np.float32)
    return features, global_descriptor / np.linalg.norm(global_descriptor)


def measure_storage(work_dir: Path, images: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    data = [synthetic_image(rng) for _ in range(images)]
    sizes = {}
    for dtype in DESCRIPTOR_DTYPES:
        path = work_dir / f"store_{dtype}.h5"
        with FeatureStore(path) as store:
            for number, (features, global_descriptor) in enumerate(data):
                store.put(f"image{number:07d}", features, image_size=(768, 1024), settings_hash=dtype,
                          global_descriptor=global_descriptor, descriptor_dtype=dtype)
        sizes[dtype] = path.stat().st_size / images
    del data
    # Keypoint reads (what re-ranking does per shortlisted image), encodings alternated per round.
    read_ms: dict[str, list[float]] = {dtype: [] for dtype in DESCRIPTOR_DTYPES}
    stores = {dtype: FeatureStore(work_dir / f"store_{dtype}.h5") for dtype in DESCRIPTOR_DTYPES}
    ids = [f"image{number:07d}" for number in range(images)]
    for round_number in range(rounds):
        order = DESCRIPTOR_DTYPES if round_number % 2 == 0 else DESCRIPTOR_DTYPES[::-1]
        for dtype in order:
            started = time.perf_counter()
            for image_id in ids:
                stores[dtype].keypoints(image_id)
            read_ms[dtype].append(1e3 * (time.perf_counter() - started) / images)
    for store in stores.values():
        store.close()

    decoded = NUM_FEATURES * (LOCAL_DIM + 2) * 4  # float32 keypoints (locations + descriptors) of one image
    print(f"\nstore of {images} synthetic images x {NUM_FEATURES} features x {LOCAL_DIM}-D + one {GLOBAL_DIM}-D "
          f"global descriptor, compacted HDF5:")
    print(f"{'encoding':>9} {'KB/image':>9} {'vs float32':>10} {'keypoints read ms':>17} {'R1M on disk':>12}")
    for dtype in DESCRIPTOR_DTYPES:
        print(f"{dtype:>9} {sizes[dtype] / 1024:>9.1f} {sizes[dtype] / sizes['float32']:>10.2f} "
              f"{statistics.median(read_ms[dtype]):>17.2f} {sizes[dtype] * ONE_MILLION / 1e9:>9.0f} GB")
    print(f"R1M extrapolation (1M images, {NUM_FEATURES} features each; DELG keeps up to 1000, its paper's 485 GB "
          "of float32 local features means ~920 features an image on average):")
    print(f"  disk: the feature store above; the global index beside it adds {GLOBAL_DIM * 4 * ONE_MILLION / 1e9:.1f} "
          "GB (bench/global_retrieval.py)")
    print(f"  memory of re-ranking, any encoding (reads are decoded to float32): the {SHORTLIST} shortlisted "
          f"images of a query {SHORTLIST * decoded / 2**20:.0f} MB, the feature cache of {FEATURE_CACHE_IMAGES} "
          f"images {FEATURE_CACHE_IMAGES * decoded / 2**20:.0f} MB; the store is read from disk, never held")
    for dtype in DESCRIPTOR_DTYPES:
        print(f"  to hold every image's local features in RAM instead ({dtype}): "
              f"{sizes[dtype] * ONE_MILLION / 2**30:.0f} GiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic images per store for the byte counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of keypoint reads (medians reported)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.7071, 1.0], help="pyramid scales")
    parser.add_argument("--max_image_size", type=int, default=640, help="photos resized to this longest side")
    parser.add_argument("--skip_photos", action="store_true", help="only the disk and memory figures")
    args = parser.parse_args(argv)
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores")
    work_dir = Path(tempfile.mkdtemp(prefix="compact_descriptors_"))
    try:
        if not args.skip_photos:
            print(f"real photo pairs, scales {args.scales}, longest side {args.max_image_size}, seeded random "
                  f"weights, local descriptors = the {LOCAL_DIM}-D autoencoder code:")
            measure_inliers(extract_pairs(args.scales, args.max_image_size), work_dir)
        measure_storage(work_dir, args.images, args.rounds)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
