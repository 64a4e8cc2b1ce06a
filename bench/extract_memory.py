"""Benchmark: memory of one extraction rank over a long run of varied image sizes (graph mode by default).

Runs DelfExtractor (pyramid, network, keypoints; default settings: 7 scales, the largest level capped
at 3.5 M pixels; no PCA, no decoding) over --images synthetic images of --sizes distinct sizes: random
sides up to --max-side px, plus 1024x768, 768x1024 and 4096x3072 (whose pyramid is downscaled to
the cap); every size once, then again in random order; one worker process per variant. Prints the
resident memory (VmRSS) and its peak (VmHWM) every --every images, then per variant: the peak, and
whether memory grows: the highest RSS after an image over the second half of the run against the
first half (which has seen every size).

Before the run, a ladder of single 1024x768 pyramids' levels (one per run, smallest first) gives
the breakdown: memory after import + model, and the growth per million pixels of the largest level.

    python bench/extract_memory.py [--images 200] [--sizes 50] [--max-side 1024] [--variants graph]
    python bench/extract_memory.py --images 60 --sizes 20 --variants graph,pynative   # shorter, both modes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import Worker, machine_description, serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("graph", "pynative")
MEMORY_TARGET_GB = 3.0
FIXED_SIZES = ((768, 1024), (1024, 768), (3072, 4096))


def memory_gb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, GB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / 1e9
    return values["VmRSS"], values["VmHWM"]


def worker(variant: str, checkpoint: str) -> None:
    import dataclasses
    import logging

    import numpy as np

    from model_utils.config import get_config
    from model_utils.device import setup_device
    from src.extraction.extractor import DelfExtractor
    from src.model.weights import build_extraction_model

    setup_device("CPU", graph_mode=variant == "graph")
    config = get_config([])
    logging.disable(logging.WARNING)  # random weights: attention scores are low and would warn on every image
    # score_threshold 0: keypoint selection does its full work (up to 1000 features) as with trained weights.
    extractor = DelfExtractor(build_extraction_model(config, checkpoint),
                              dataclasses.replace(config.extraction, use_pca=False, score_threshold=0.0))

    def handle(job):
        if job["cmd"] == "memory":
            return memory_gb()
        if job["cmd"] == "level":  # one network input of the given size
            from src.extraction.pyramid import LevelInput

            image = np.random.default_rng(0).uniform(-1, 1, (1, 3, *job["size"])).astype(np.float32)
            extractor.run_network([LevelInput(1.0, (1.0, 1.0), image)])
            return memory_gb()
        height, width = job["size"]
        image = np.random.default_rng(job["seed"]).integers(0, 256, (height, width, 3), dtype=np.uint8)
        started = time.perf_counter()
        features = extractor(image)
        return {"seconds": time.perf_counter() - started, "features": len(features.locations),
                "memory": memory_gb()}

    serve(handle)


def save_checkpoint(path: Path) -> None:
    import subprocess

    code = ("import sys, mindspore; sys.path.insert(0, sys.argv[2]); from model_utils.device import setup_device; "
            "setup_device('CPU', graph_mode=False); from src.model.network import KERAS1_BN_EPSILON, DelfModel; "
            "mindspore.set_seed(0); mindspore.save_checkpoint(DelfModel('test'), sys.argv[1], "
            "append_dict={'bn_epsilon': KERAS1_BN_EPSILON})")
    subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)], check=True, env={**os.environ, "GLOG_v": "3"})


def workload(images: int, sizes: int, min_side: int, max_side: int, seed: int = 0) -> list[tuple[int, int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    distinct = list(FIXED_SIZES)
    while len(distinct) < sizes:
        size = tuple(int(side) for side in rng.integers(min_side, max_side + 1, 2))
        if size not in distinct:
            distinct.append(size)
    # Every size once first (so the first half of the run has seen them all), then again in random order.
    first_pass, rest = list(distinct), [distinct[index % len(distinct)] for index in range(images - len(distinct))]
    rng.shuffle(first_pass)
    rng.shuffle(rest)
    return first_pass + rest


def ladder(workers: dict[str, Worker]) -> None:
    """Memory after single network inputs of growing size: the base and the growth per M pixels."""
    sizes = [(round(768 * s), round(1024 * s)) for s in (0.25, 0.5, 1.0, 1.4142, 2.0)]
    print("breakdown: memory (VmHWM, GB) after the network ran on one input of each size, smallest first")
    for name, w in workers.items():
        start = w.ask(cmd="memory")[1]
        peaks = [w.ask(cmd="level", size=size)[1] for size in sizes]
        pixels = [h * w_ / 1e6 for h, w_ in sizes]
        slope = (peaks[-1] - peaks[-3]) / (pixels[-1] - pixels[-3])
        cells = ", ".join(f"{h}x{w_} {peak:.2f}" for (h, w_), peak in zip(sizes, peaks, strict=True))
        print(f"  {name:9s} model loaded {start:.2f}; {cells}; growth {slope:.2f} GB per M pixels of the input")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sizes", type=int, default=50, help="distinct image sizes (3 of them fixed, see above)")
    parser.add_argument("--min-side", type=int, default=200)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--every", type=int, default=10, help="print memory every this many images")
    parser.add_argument("--variants", default="graph", help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint)
        return
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"variants must be among {', '.join(VARIANTS)}")
    print(machine_description(), flush=True)
    order = workload(args.images, args.sizes, args.min_side, args.max_side)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "random.ckpt"
        save_checkpoint(checkpoint)
        workers = {name: Worker(__file__, name, ["--checkpoint", str(checkpoint)]) for name in variants}
        ladder(workers)
        trace = {name: [] for name in workers}
        for index, size in enumerate(order):
            for name, w in workers.items():
                trace[name].append(w.ask(cmd="image", size=size, seed=index))
            if (index + 1) % args.every == 0 or index + 1 == len(order):
                cells = ", ".join(f"{name} RSS {trace[name][-1]['memory'][0]:.2f} peak "
                                  f"{trace[name][-1]['memory'][1]:.2f}" for name in workers)
                print(f"image {index + 1}/{len(order)} {size[0]}x{size[1]}: {cells} GB", flush=True)
        for w in workers.values():
            w.close()
    half = len(order) // 2
    print(f"\n{len(order)} images of {len(set(order))} sizes ({args.min_side}-{args.max_side} px a side, plus "
          f"{', '.join(f'{h}x{w}' for h, w in FIXED_SIZES)}), default extraction settings")
    for name, records in trace.items():
        rss = [record["memory"][0] for record in records]
        first_peak, second_peak = max(rss[:half]), max(rss[half:])
        peak = records[-1]["memory"][1]
        seconds = statistics.median(record["seconds"] for record in records)
        if set(order[:half]) == set(order):
            growth = "no growth" if second_peak <= first_peak * 1.02 else "GROWS"
        else:
            growth = "too short to tell: the first half has not seen every size"
        print(f"{name:9s} peak {peak:.2f} GB ({'met' if peak <= MEMORY_TARGET_GB else 'MISSED'}: target "
              f"<= {MEMORY_TARGET_GB:g} GB); highest RSS after an image: first half {first_peak:.2f} GB, second half "
              f"{second_peak:.2f} GB ({growth}); median {seconds:.1f} s per image")


if __name__ == "__main__":
    main()
