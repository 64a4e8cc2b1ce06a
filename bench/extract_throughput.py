"""Benchmark: DELF network throughput on images of many sizes vs one size: graph, PyNative, PyTorch.

Measures, in one run, the extraction network (DelfModel "test" over an image's pyramid levels:
what DelfExtractor runs per image) on
  - "mixed": N images of N different seeded random sizes (new sizes every round), and
  - "same":  N images of one size (the mean pixel count and aspect of the first mixed set),
for these variants (default graph_dyn, pynative, torch), each in its own persistent worker process
(compiled graphs survive across rounds; oneDNN reads its ISA cap once per process):
  - graph_dyn:    graph mode, input H and W declared free (src/model/shapes.py, the extraction
                  default): one compilation for every size;
  - graph_dyn_o1: the same with jit_level O1;
  - graph_static: graph mode compiled per input shape (the same-size set, plus
                  --static-mixed-images images of new sizes to show the cost of compiling);
  - pynative:     PyNative mode;
  - torch:        the same network in PyTorch with the same weights on the same inputs (baseline).
The workers take turns image by image (the order rotates), so a noisy machine hits them alike.
The first image of every workload and round is reported apart and left out of images/s; the
warm-up on one extra size (where graph_dyn compiles) is reported as "warm-up".

Then, with --prefetch-photos K > 0, the whole extraction (decode, pyramid, network, keypoints,
store) of K real photos (downscaled to --max-side) through extract_to_store, with and without the
prefetch thread, alternated --prefetch-rounds times in the graph_dyn worker. Last, each worker's
peak resident memory: graph mode keeps buffers for every layer at the largest size it has seen.

    python bench/extract_throughput.py [--images 20] [--rounds 2] [--variants graph_dyn,pynative,torch]
        [--min-side 300] [--max-side 640] [--scales 0.25,0.3536,0.5,0.7071,1.0,1.4142,2.0] [--check]
        [--prefetch-photos 6] [--prefetch-rounds 2]
    python bench/extract_throughput.py --variants graph_dyn,graph_static --images 8   # static A/B
    python bench/extract_throughput.py --variants graph_dyn,graph_dyn_o1 --images 8   # jit_level A/B
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "images"
SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
VARIANTS = ("graph_dyn", "graph_dyn_o1", "graph_static", "pynative", "torch")
DEFAULT_VARIANTS = ("graph_dyn", "pynative", "torch")  # the others hold much memory: run them in a pass of their own
CHECK_SHAPES = ((120, 200), (257, 311), (401, 333), (640, 480))


# ------------------------------------------------------------------ workload (identical in every worker)

def mixed_sizes(count: int, seed: int, low: int, high: int) -> list[tuple[int, int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(low, high + 1, size=(count, 2))]


def pyramid(height: int, width: int, scales: list[float], seed: int) -> list:
    """Network inputs of a random photo-sized image, made by the extractor's own pyramid code."""
    import numpy as np

    from model_utils.config import ExtractionConfig
    from src.extraction.pyramid import pyramid_inputs

    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return [level.image for level in pyramid_inputs(image, ExtractionConfig(image_scales=tuple(scales)))]


def pyramid_pixels(height: int, width: int, scales: list[float]) -> int:
    return sum(round(height * s) * round(width * s) for s in scales)


# ------------------------------------------------------------------ the networks (worker side)

def mindspore_network(variant: str, weights_path: str):
    import mindspore
    import numpy as np
    from mindspore import Tensor

    from model_utils.device import setup_device
    from src.model.network import DelfModel
    from src.model.shapes import set_input_shapes
    from src.model.weights import assign_weights

    setup_device("CPU", graph_mode=variant != "pynative")
    model = DelfModel("test")
    with np.load(weights_path) as weights:
        assign_weights(model, dict(weights), weights_path)
    model.set_train(False)
    if variant.startswith("graph_dyn"):
        set_input_shapes(model, "dynamic")
    if variant == "graph_dyn_o1":
        model.set_jit_config(mindspore.JitConfig(jit_level="O1"))

    def run(level):
        attention, features = model(Tensor(level))
        return attention.asnumpy(), features.asnumpy()

    return run, model


def torch_network(weights_path: str):
    """The same network in PyTorch (functional: the same weights, Keras 'same' padding)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    with np.load(weights_path) as arrays:
        w = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    epsilon = 1e-3  # KERAS1_BN_EPSILON, as DelfModel("test")

    def conv(x, prefix, stride=1):
        weight = w[prefix + ".weight"]
        k = weight.shape[-1]
        padding = 0
        if k > 1 and stride == 1:
            padding = k // 2
        elif k > 1:  # TF 'same' with stride 2: the extra pixel goes after
            pads = []
            for size in (x.shape[3], x.shape[2]):
                total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return F.conv2d(x, weight, w[prefix + ".bias"], stride, padding)

    def bn(x, prefix):
        return F.batch_norm(x, w[prefix + ".moving_mean"], w[prefix + ".moving_variance"], w[prefix + ".gamma"],
                            w[prefix + ".beta"], False, 0.0, epsilon)

    stages = (("2", 3, 1), ("3", 4, 2), ("4", 6, 2))

    def forward(x):
        x = F.max_pool2d(torch.relu(bn(conv(x, "backbone.conv1", 2), "backbone.bn_conv1")), 3, 2)
        for stage, blocks, stride in stages:
            for index in range(blocks):
                p = f"backbone.stage{stage}.res{stage}{'abcdef'[index]}"
                s = stride if index == 0 else 1
                y = torch.relu(bn(conv(x, p + ".branch2a", s), p + ".bn2a"))
                y = torch.relu(bn(conv(y, p + ".branch2b"), p + ".bn2b"))
                y = bn(conv(y, p + ".branch2c"), p + ".bn2c")
                shortcut = bn(conv(x, p + ".branch1", s), p + ".bn1") if index == 0 else x
                x = torch.relu(y + shortcut)
        block3 = x[:, :, ::2, ::2]
        a = torch.relu(bn(conv(block3, "attention.conv1"), "attention.bn_conv1"))
        return F.softplus(conv(a, "attention.conv2")), block3

    def run(level):
        with torch.inference_mode():
            attention, features = forward(torch.from_numpy(level))
            return attention.numpy(), features.contiguous().numpy()

    return run


def pipeline_seconds(model, photos: list[str], depth: int, scales: list[float], max_side: int) -> float:
    """Seconds of extract_to_store over `photos` into a fresh store, with `depth` prefetched images."""
    from model_utils.config import ExtractionConfig
    from src.extraction.extractor import DelfExtractor, extract_to_store
    from src.extraction.store import FeatureStore

    extractor = DelfExtractor(model, ExtractionConfig(image_scales=tuple(scales), score_threshold=0.0,
                                                      use_pca=False, max_image_size=max_side))
    with tempfile.TemporaryDirectory() as folder:
        store = FeatureStore(Path(folder) / "features.h5")  # journal writes only: no compaction timed
        paths = {Path(photo).stem: Path(photo) for photo in photos}
        started = time.perf_counter()
        report = extract_to_store(paths, store, extractor, "bench", progress=False, prefetch=depth)
        seconds = time.perf_counter() - started
        store.close()
    if report.failed:
        raise RuntimeError(f"pipeline failed on {report.failed}")
    return seconds


def worker(variant: str, weights_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    if variant == "weights":
        _write_weights(weights_path)
        return
    model = None
    if variant == "torch":
        run = torch_network(weights_path)
    else:
        run, model = mindspore_network(variant, weights_path)
    print("READY", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if job["cmd"] == "run":  # network seconds per image over the pyramids of the given images
            times = []
            for height, width, seed in job["images"]:
                levels = pyramid(height, width, job["scales"], seed)
                started = time.perf_counter()
                for level in levels:
                    run(level)
                times.append(time.perf_counter() - started)
            result = times
        elif job["cmd"] == "outputs":  # outputs of given input shapes, for the equality check
            import numpy as np

            arrays = {}
            for index, (height, width) in enumerate(job["shapes"]):
                level = np.random.default_rng(index).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
                arrays[f"attention{index}"], arrays[f"block3_{index}"] = run(level)
            np.savez(job["path"], **arrays)
            result = None
        elif job["cmd"] == "pipeline":
            result = pipeline_seconds(model, job["photos"], job["depth"], job["scales"], job["max_side"])
        elif job["cmd"] == "peak_memory":  # peak resident memory of this worker, GB
            import resource

            result = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        elif job["cmd"] == "prepare":  # decode + pyramid of each photo (what prefetching can hide)
            from model_utils.config import ExtractionConfig
            from src.extraction.images import load_image
            from src.extraction.pyramid import pyramid_inputs

            config = ExtractionConfig(image_scales=tuple(job["scales"]), max_image_size=job["max_side"])
            result = []
            for photo in job["photos"]:
                started = time.perf_counter()
                pyramid_inputs(load_image(photo), config)
                result.append(time.perf_counter() - started)
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ parent

class Worker:
    def __init__(self, variant: str, weights_path: Path) -> None:
        self.variant = variant
        env = {**os.environ, "GLOG_v": "3"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", variant, "--weights", str(weights_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return None
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"worker {self.variant} died (exit {self.proc.wait()})")

    def ask(self, **job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def save_random_weights(path: Path) -> None:
    """Seeded random DelfModel("test") weights (as tests/conftest.py), shared by every worker."""
    subprocess.run([sys.executable, __file__, "--worker", "weights", "--weights", str(path)], check=True,
                   env={**os.environ, "GLOG_v": "3"})


def _write_weights(path: str) -> None:
    import mindspore
    import numpy as np

    from model_utils.device import setup_device
    from src.model.network import DelfModel

    setup_device("CPU", graph_mode=False)
    mindspore.set_seed(0)
    model = DelfModel("test")
    np.savez(path, **{param.name: param.asnumpy() for param in model.get_parameters()})


def check_outputs(workers: dict[str, Worker], folder: Path) -> None:
    import numpy as np

    outputs = {}
    for name, w in workers.items():
        path = folder / f"check_{name}.npz"
        w.ask(cmd="outputs", shapes=CHECK_SHAPES, path=str(path))
        with np.load(path) as arrays:
            outputs[name] = dict(arrays)
    reference = "graph_static" if "graph_static" in outputs else next(iter(outputs))
    print(f"output check on input shapes {list(CHECK_SHAPES)}: largest |difference| to {reference} "
          "(relative to the largest value)")
    for name, arrays in outputs.items():
        if name == reference:
            continue
        worst = {"attention": 0.0, "block3": 0.0}
        for key, want in outputs[reference].items():
            difference = float(np.abs(want - arrays[key]).max()) / (float(np.abs(want).max()) or 1.0)
            kind = "attention" if key.startswith("attention") else "block3"
            worst[kind] = max(worst[kind], difference)
        print(f"  {name:13s} attention {worst['attention']:.3g}, block3 {worst['block3']:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="images per workload (the first one is reported apart)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the mixed sizes are new each round)")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="pyramid scales")
    parser.add_argument("--min-side", type=int, default=300, help="smallest image side of the mixed set")
    parser.add_argument("--max-side", type=int, default=640,
                        help="largest image side of the mixed set (graph mode holds ~7 GB at 640, ~15 GB at 1024)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--static-mixed-images", type=int, default=1,
                        help="images of new sizes run by graph_static per round (each compiles every level shape)")
    parser.add_argument("--check", action="store_true", help="compare the outputs of every variant first")
    parser.add_argument("--prefetch-photos", type=int, default=6,
                        help="real photos extracted with and without prefetching (0: skip that part)")
    parser.add_argument("--prefetch-rounds", type=int, default=2, help="alternations of the prefetch A/B")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.weights)
        return

    scales = [float(s) for s in args.scales.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "torch" in variants and subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                                              check=False).returncode:
        print("PyTorch is not importable: no baseline (pip install torch)")
        variants.remove("torch")

    with tempfile.TemporaryDirectory() as folder:
        weights_path = Path(folder) / "delf_random_weights.npz"
        save_random_weights(weights_path)
        workers = {}
        for name in variants:
            started = time.perf_counter()
            workers[name] = Worker(name, weights_path)
            print(f"started {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        if args.check:
            check_outputs(workers, Path(folder))
        # Warm-up on a size in neither set: graph_dyn compiles here (its one compilation).
        warm_up = {name: w.ask(cmd="run", images=[(333, 444, 7)], scales=scales)[0] for name, w in workers.items()}
        results = run_rounds(workers, args, scales)
        pipeline = run_prefetch(workers, args, scales) if args.prefetch_photos > 0 else None
        memory = {}
        for name, w in workers.items():
            if w.proc.poll() is None:
                memory[name] = w.ask(cmd="peak_memory")
                w.close()
    report(results, warm_up, pipeline, args, scales)
    print("peak resident memory per worker: " + ", ".join(f"{name} {gb:.1f} GB" for name, gb in memory.items()))


def workload_sizes(args, round_index: int) -> dict[str, list[tuple[int, int]]]:
    first = mixed_sizes(args.images, 1000, args.min_side, args.max_side)
    mean_area = statistics.mean(h * w for h, w in first)
    aspect = statistics.mean(w / h for h, w in first)
    same_h = int(round(math.sqrt(mean_area / aspect)))
    same = (same_h, int(round(mean_area / same_h)))
    return {"mixed": mixed_sizes(args.images, 1000 + round_index, args.min_side, args.max_side),
            "same": [same] * args.images}


def run_rounds(workers: dict[str, Worker], args, scales: list[float]) -> dict:
    """{variant: {workload: [per-round list of per-image seconds]}}, image by image in turn."""
    results = {name: {"mixed": [], "same": []} for name in workers}
    names = list(workers)
    for round_index in range(args.rounds):
        sizes = workload_sizes(args, round_index)
        for name in names:
            for workload in sizes:
                results[name][workload].append([])
        for index in range(args.images):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in [name for name in order if name in names]:
                for workload, workload_sizes_ in sizes.items():
                    if name == "graph_static" and workload == "mixed" and index >= args.static_mixed_images:
                        continue
                    height, width = workload_sizes_[index]
                    try:
                        seconds = workers[name].ask(cmd="run", images=[(height, width, 100 * round_index + index)],
                                                    scales=scales)[0]
                    except RuntimeError as error:  # e.g. killed for memory on a shared machine: go on without it
                        print(f"{error}; its results so far are kept", flush=True)
                        names.remove(name)
                        break
                    results[name][workload][-1].append(seconds)
            cells = []
            for name in names:
                mixed, same = results[name]["mixed"][-1], results[name]["same"][-1]
                shown = f"{mixed[-1]:.2f}" if len(mixed) == index + 1 else "-"
                cells.append(f"{name} {shown}/{same[-1]:.2f}")
            print(f"round {round_index} image {index} (s, mixed/same): " + ", ".join(cells), flush=True)
    return results


def run_prefetch(workers: dict[str, Worker], args, scales: list[float]) -> dict | None:
    runner = workers.get("graph_dyn")
    if runner is None:
        print("prefetch A/B skipped: it runs in the graph_dyn worker")
        return None
    photos = sorted(str(p) for p in PHOTOS.glob("*.jpg"))[:args.prefetch_photos]
    if not photos:
        print(f"prefetch A/B skipped: no photos in {PHOTOS}")
        return None
    runner.ask(cmd="pipeline", photos=photos[:1], depth=0, scales=scales, max_side=args.max_side)  # warm-up
    seconds = {0: [], 1: []}
    for repeat in range(args.prefetch_rounds):
        for depth in ((0, 1) if repeat % 2 == 0 else (1, 0)):
            seconds[depth].append(runner.ask(cmd="pipeline", photos=photos, depth=depth, scales=scales,
                                             max_side=args.max_side))
            print(f"pipeline prefetch {depth}: {seconds[depth][-1]:.1f} s for {len(photos)} photos", flush=True)
    prepare = runner.ask(cmd="prepare", photos=photos, scales=scales, max_side=args.max_side)
    return {"photos": len(photos), "seconds": seconds, "prepare": statistics.median(prepare)}


def report(results: dict, warm_up: dict, pipeline: dict | None, args, scales: list[float]) -> None:
    sizes0 = workload_sizes(args, 0)
    mixed_pixels = statistics.mean(pyramid_pixels(h, w, scales) for r in range(args.rounds)
                                   for h, w in workload_sizes(args, r)["mixed"][1:])
    same_pixels = pyramid_pixels(*sizes0["same"][0], scales)
    print(f"\n{args.images} images per workload, {args.rounds} round(s), scales {scales}; mixed sides "
          f"{args.min_side}-{args.max_side} (mean pyramid {mixed_pixels / 1e6:.2f} Mpx), same size "
          f"{sizes0['same'][0][0]}x{sizes0['same'][0][1]} ({same_pixels / 1e6:.2f} Mpx); {os.cpu_count()} CPUs.")
    print("s/image = mean over the images after the first of each round, median over rounds (network only).")

    def steady(runs: list[list[float]]) -> float | None:
        means = [statistics.mean(run[1:]) for run in runs if len(run) > 1]
        return statistics.median(means) if means else None

    def first(runs: list[list[float]]) -> float | None:
        return statistics.median(run[0] for run in runs) if runs and runs[0] else None

    table = {name: {w: steady(r[w]) for w in ("mixed", "same")} for name, r in results.items()}
    torch = table.get("torch", {})
    header = (f"{'variant':13s} {'warm-up s':>9s} {'1st mixed':>9s} {'1st same':>8s} {'mixed s/img':>11s} "
              f"{'same s/img':>10s} {'mixed/same':>10s} {'per-px m/s':>10s} {'mixed/torch':>11s} {'same/torch':>10s}")
    print(header)

    def cell(value, width, fmt="{:.2f}"):
        return f"{fmt.format(value):>{width}s}" if value is not None else f"{'-':>{width}s}"

    for name, row in table.items():
        mixed, same = row["mixed"], row["same"]
        ratio = mixed / same if mixed and same else None
        per_pixel = (mixed / mixed_pixels) / (same / same_pixels) if mixed and same else None
        print(f"{name:13s} {cell(warm_up[name], 9)} {cell(first(results[name]['mixed']), 9)} "
              f"{cell(first(results[name]['same']), 8)} {cell(mixed, 11)} {cell(same, 10)} {cell(ratio, 10)} "
              f"{cell(per_pixel, 10)} {cell(mixed / torch['mixed'] if mixed and torch.get('mixed') else None, 11)} "
              f"{cell(same / torch['same'] if same and torch.get('same') else None, 10)}")
    if "graph_static" in results and results["graph_static"]["mixed"] and any(results["graph_static"]["mixed"]):
        new_size = statistics.mean(s for run in results["graph_static"]["mixed"] for s in run)
        print(f"graph_static on images of new sizes: {new_size:.1f} s/image ({len(scales)} compilations each)")
    dyn = table.get("graph_dyn", {})
    if dyn.get("mixed") and dyn.get("same"):
        value = dyn["mixed"] / dyn["same"]
        verdict = "met" if value <= 1.3 else "MISSED"
        print(f"target: graph_dyn 20 sizes within 1.3x of one size: {value:.2f}x -> {verdict}")
    if dyn.get("mixed") and torch.get("mixed"):
        value = dyn["mixed"] / torch["mixed"]
        print(f"target: graph_dyn 20 sizes within 1.2x of PyTorch on the same inputs: {value:.2f}x -> "
              f"{'met' if value <= 1.2 else 'MISSED'}")
    if pipeline:
        off, on = (statistics.median(pipeline["seconds"][d]) for d in (0, 1))
        print(f"whole extraction of {pipeline['photos']} photos at most {args.max_side} px (graph_dyn): "
              f"prefetch off {off:.1f} s, on {on:.1f} s, "
              f"on/off {on / off:.3f} (runs {pipeline['seconds']}); decode + pyramid alone "
              f"{pipeline['prepare'] * 1000:.0f} ms per photo")


if __name__ == "__main__":
    main()
