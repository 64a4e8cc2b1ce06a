"""Benchmark: whole DELF extraction (7-scale pyramid, keypoints, PCA) of a 1024x768 photo on CPU.

Graph mode compiles the network once per pyramid shape and then runs faster; PyNative needs no
compilation. Both are timed in one run, in separate processes, over images of one size (as in
Oxford5k, where nearly every image is 1024x768 or 768x1024), plus the same truncated ResNet50 in
PyTorch over the same pyramid sizes as a baseline for the network part when it is importable.

    python bench/extract.py [--images 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "images" / "sacre_coeur2.jpg"  # 1024 x 768
SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def _child(mode: str, num_images: int) -> None:
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from model_utils.config import ExtractionConfig, get_config
    from model_utils.device import setup_device
    from src.extraction.extractor import DelfExtractor
    from src.extraction.images import load_image
    from src.extraction.pca import PcaParameters
    from src.model.weights import build_extraction_model

    setup_device("CPU", graph_mode=mode == "graph")
    model = build_extraction_model(get_config(["--conv_impl=native"]), "")
    rng = np.random.default_rng(0)
    pca = PcaParameters(np.zeros(1024), np.linalg.qr(rng.standard_normal((1024, 1024)))[0], None)
    extractor = DelfExtractor(model, ExtractionConfig(score_threshold=0.0), pca)
    photo = load_image(PHOTO)
    started = time.perf_counter()
    extractor(photo)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(num_images):
        extractor(np.roll(photo, index * 7, axis=1))  # same size, other content
    steady = (time.perf_counter() - started) / num_images
    print("RESULT " + json.dumps({"first": first, "steady": steady}), flush=True)


def _torch_child(num_images: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from backbone import _time_torch

    sizes = [(round(768 * s), round(1024 * s)) for s in SCALES]
    result = _time_torch(sizes, num_images)
    print("RESULT " + json.dumps({"first": None, "steady": result["seconds"]}), flush=True)


def _run(args: list[str]) -> dict | None:
    env = {**os.environ, "GLOG_v": "3"}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {args} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="images timed after the first")
    parser.add_argument("--child", choices=("graph", "pynative", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "torch":
        _torch_child(args.images)
        return
    if args.child:
        _child(args.child, args.images)
        return

    results = {mode: _run(["--child", mode, "--images", str(args.images)]) for mode in ("pynative", "graph")}
    has_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, check=False).returncode == 0
    if has_torch:
        results["PyTorch network only"] = _run(["--child", "torch", "--images", str(args.images)])
    print(f"DELF extraction of a 1024x768 photo, 7 scales, 1000 keypoints, PCA to 40-D; {os.cpu_count()} threads")
    print(f"{'mode':24s} {'first image s':>14s} {'then s/image':>13s} {'images/s':>9s} {'vs pynative':>12s}")
    base = results["pynative"]["steady"] if results.get("pynative") else None
    for mode, result in results.items():
        if not result:
            continue
        first = f"{result['first']:.1f}" if result["first"] is not None else "-"
        ratio = f"{base / result['steady']:.2f}x" if base else "-"
        print(f"{mode:24s} {first:>14s} {result['steady']:13.2f} {1 / result['steady']:9.2f} {ratio:>12s}")


if __name__ == "__main__":
    main()
