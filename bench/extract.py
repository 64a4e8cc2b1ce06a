"""Benchmark: whole DELF extraction (7-scale pyramid, keypoints, PCA) of a 1024x768 photo on CPU.

Graph mode (one compilation for every size, the first image pays it) and PyNative run the whole
extraction (DelfExtractor: pyramid, network, 1000 keypoints, PCA to 40-D) of a real 1024x768 photo
(Oxford5k's usual size), shifted a few pixels per image so that the content changes; PyTorch runs
the network alone on the same pyramid with the same weights as the baseline for the network part
(bench/extract_throughput.py's model). Each in its own persistent worker, taking turns image by
image; peak resident memory per worker at the end.

    python bench/extract.py [--images 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import Worker, machine_description, peak_rss_gb, serve, torch_importable

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "images" / "sacre_coeur2.jpg"  # 1024 x 768


def worker(variant: str, weights_path: str) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from model_utils.config import get_config
    from src.extraction.images import load_image
    from src.extraction.pyramid import pyramid_inputs

    config = get_config([])
    extraction = dataclasses.replace(config.extraction, score_threshold=0.0)  # random weights: low attention
    photo = load_image(PHOTO)
    if variant == "torch":
        from extract_throughput import torch_network

        network = torch_network(weights_path)

        def extract(image):
            network(pyramid_inputs(image, extraction))
    else:
        from model_utils.device import setup_device
        from src.extraction.extractor import DelfExtractor
        from src.extraction.pca import PcaParameters
        from src.model.weights import build_extraction_model

        setup_device("CPU", graph_mode=variant == "graph")
        rng = np.random.default_rng(0)
        pca = PcaParameters(np.zeros(1024), np.linalg.qr(rng.standard_normal((1024, 1024)))[0], None)
        extractor = DelfExtractor(build_extraction_model(config, str(Path(weights_path).with_suffix(".ckpt"))),
                                  extraction, pca)

        def extract(image):
            extractor(image)

    def handle(job):
        if job["cmd"] == "peak_memory":
            return peak_rss_gb()
        started = time.perf_counter()
        extract(np.roll(photo, job["index"] * 7, axis=1))  # same size, other content
        return time.perf_counter() - started

    serve(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images timed after the first")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.weights)
        return
    from extract_throughput import save_random_weights

    print(machine_description(), flush=True)
    variants = ["graph", "pynative"] + (["torch"] if torch_importable() else [])
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.npz"
        save_random_weights(weights)
        workers = {name: Worker(__file__, name, ["--weights", str(weights)]) for name in variants}
        seconds = {name: [] for name in variants}
        for index in range(args.images + 1):
            for name in variants[index % len(variants):] + variants[:index % len(variants)]:
                seconds[name].append(workers[name].ask(cmd="image", index=index))
            print(f"image {index}: " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in seconds.items()),
                  flush=True)
        memory = {name: w.ask(cmd="peak_memory") for name, w in workers.items()}
        for w in workers.values():
            w.close()
    print(f"\nDELF extraction of a 1024x768 photo, 7 scales, 1000 keypoints, PCA to 40-D (PyTorch: the network "
          f"only); first image apart, then the median of {args.images}")
    print(f"{'variant':10s} {'first image s':>14s} {'then s/image':>13s} {'x torch':>8s} {'peak RSS GB':>12s}")
    torch_time = statistics.median(seconds["torch"][1:]) if "torch" in seconds else None
    for name, values in seconds.items():
        steady = statistics.median(values[1:])
        ratio = f"{steady / torch_time:.2f}" if torch_time else "-"
        print(f"{name:10s} {values[0]:14.2f} {steady:13.2f} {ratio:>8s} {memory[name]:12.2f}")


if __name__ == "__main__":
    main()
