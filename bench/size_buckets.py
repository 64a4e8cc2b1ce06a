"""What static graphs over padded size buckets would cost: compiled shapes and extra pixels.

Graph mode with static shapes compiles once per input shape (~7 s and ~1.3 GB each on CPU).
Padding every pyramid level up to a bucket bounds the number of shapes at the price of extra
pixels (and of features changed near the padded border). This prints, for the mixed workload of
bench/extract_throughput.py and for a Paris-like set of many sizes, the number of distinct level
shapes and the padded/real pixel ratio for side multiples of 32 to 256 px and for geometric buckets.

    python bench/size_buckets.py [--images 1000] [--min-side 500] [--max-side 1024]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_throughput import SCALES, mixed_sizes  # noqa: E402
from model_utils.config import ExtractionConfig  # noqa: E402
from src.extraction.pyramid import level_sizes  # noqa: E402


def multiple_of(step: int):
    return lambda side: math.ceil(side / step) * step


def geometric(ratio: float, smallest: int = 64):
    return lambda side: round(smallest * ratio ** max(0, math.ceil(math.log(side / smallest, ratio) - 1e-9)))


def report(name: str, sizes: list[tuple[int, int]], config: ExtractionConfig) -> None:
    levels = [(h, w) for height, width in sizes for _, h, w in level_sizes(height, width, config)]
    pixels = sum(h * w for h, w in levels)
    print(f"{name}: {len(levels)} levels, {len(set(levels))} distinct shapes")
    buckets = {f"multiples of {step} px": multiple_of(step) for step in (32, 64, 128, 256)}
    buckets.update({f"geometric x{ratio}": geometric(ratio) for ratio in (1.25, 1.5)})
    for label, bucket in buckets.items():
        padded = [(bucket(h), bucket(w)) for h, w in levels]
        ratio = sum(h * w for h, w in padded) / pixels
        print(f"  {label:22s} {len(set(padded)):5d} shapes, padded / real pixels {ratio:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images of the many-sizes set")
    parser.add_argument("--min-side", type=int, default=500)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # "downscaled to fit max_pixels_per_scale" for every large image
    config = ExtractionConfig(image_scales=SCALES)
    report("bench/extract_throughput.py mixed set (20 images, 300-640 px)", mixed_sizes(20, 1000, 300, 640), config)
    report(f"{args.images} images of {args.min_side}-{args.max_side} px",
           mixed_sizes(args.images, 7, args.min_side, args.max_side), config)


if __name__ == "__main__":
    main()
