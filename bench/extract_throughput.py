"""Benchmark: the extraction network over image pyramids of many sizes: graph vs PyNative vs PyTorch.

Measures, in one run, the extraction network (DelfModel "test" over every level of an image's
pyramid, what DelfExtractor.run_network does per image) on N images of N seeded random sizes (sides
--min-side..--max-side, new sizes every round; pyramids as extraction builds them: 7 scales, the
largest level capped at 3.5 M pixels), for these variants, each in its own persistent worker
process (compiled graphs survive across rounds; oneDNN reads its ISA cap once per process):
  - graph:               the network as extraction builds it (build_extraction_model: BatchNorms
                         folded) in graph mode with free input H and W (one compilation for every size);
  - pynative:            the same network in PyNative mode;
  - torch:               the same network in PyTorch with the same weights on the same inputs, as a
                         user would run it: eager, torch.inference_mode(), all cores, BatchNorm layers;
levers, measured against `graph` when asked for with --variants:
  - graph_unfolded:      graph without BatchNorm folding;
  - graph_o1:            graph with jit_level O1 (MindSpore's graph-kernel fusion);
  - graph_largest_first: graph running the pyramid levels from the largest down;
  - graph_static:        graph compiled per input shape (each image's levels are new shapes here);
  - graph_no_pipeline:   graph without the runtime's asynchronous pipeline (shape inference, resize and
                         launch of dynamic-shape kernels in threads of their own: MS_DEV_RUNTIME_CONF).
The workers take turns image by image (the order rotates), so a load change hits them alike. The
first image of every round is reported apart; a warm-up image of another size goes first (graph
compiles there). Last, each worker's peak resident memory (ru_maxrss): the memory one extraction
rank needs for the network at these sizes.

    python bench/extract_throughput.py [--images 12] [--rounds 2] [--min-side 300] [--max-side 1024]
        [--variants graph,pynative,torch] [--check] [--same-size] [--prefetch-photos 0]
    python bench/extract_throughput.py --variants graph,graph_unfolded,graph_o1,graph_largest_first --images 8

Notes: levers, alternated in one run with `graph` (ratio = variant / graph; --images 6 --rounds 2
--max-side 640 on a 2-core AMD EPYC (Zen 4, AVX-512), load average 2.2-3.5):
  - BatchNorm folding: KEPT (graph_unfolded / graph = 1.13).
  - jit_level O1 (graph-kernel fusion of the ReLU / add / bias chains): 0.99, not kept.
  - largest pyramid level first: 1.00, not kept.
  - thread settings: MindSpore's kernels and its oneDNN (threadpool runtime, nthr = cores) already
    use every core; the runtime's pipeline threads off (graph_no_pipeline): 1.01, default kept.
  The defaults' run (12 images, 2 rounds, 300-1024 px): graph 3.08 s/image = 0.64x PyTorch 2.13
  (4.83 s), PyNative 0.84x; peak RSS graph 2.07 GB, PyNative 2.84 GB, PyTorch 2.91 GB.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import Worker, machine_description, peak_rss_gb, serve, torch_importable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "data" / "images"
SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
VARIANTS = ("graph", "pynative", "torch", "graph_unfolded", "graph_o1", "graph_largest_first", "graph_static",
            "graph_no_pipeline")
VARIANT_ENV = {"graph_no_pipeline": {"MS_DEV_RUNTIME_CONF": "pipeline:False"}}
DEFAULT_VARIANTS = ("graph", "pynative", "torch")
CHECK_SHAPES = ((120, 200), (257, 311), (401, 333), (640, 480))
MEMORY_TARGET_GB = 3.0


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
    return pyramid_inputs(image, ExtractionConfig(image_scales=tuple(scales)))


def pyramid_pixels(height: int, width: int, scales: list[float]) -> int:
    return sum(level.image.shape[2] * level.image.shape[3] for level in pyramid(height, width, scales, 0))


# ------------------------------------------------------------------ the networks (worker side)

def mindspore_network(variant: str, checkpoint: str):
    """run(levels) -> [(attention, features)] through DelfExtractor.run_network, as extraction does."""
    import mindspore

    from model_utils.config import get_config
    from model_utils.device import setup_device
    from src.extraction.extractor import DelfExtractor
    from src.model.weights import build_extraction_model, build_model

    setup_device("CPU", graph_mode=variant != "pynative")
    config = get_config([])
    if variant == "graph_unfolded":
        model = build_model("test", weights_path=checkpoint, required_prefixes=("backbone.", "attention."))
        model.set_train(False)
    else:
        model = build_extraction_model(config, checkpoint)
    if variant == "graph_o1":
        model.set_jit_config(mindspore.JitConfig(jit_level="O1"))
    shapes = "static" if variant == "graph_static" else "dynamic"
    extractor = DelfExtractor(model, config.extraction, input_shapes=shapes)

    def run(levels):
        if variant == "graph_largest_first":
            return extractor.run_network(levels[::-1])[::-1]
        return extractor.run_network(levels)

    return run, model


def torch_network(weights_path: str):
    """The same network in PyTorch: nn.Module layers in eval mode (Keras 'same' padding), the same weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from src.extraction.pyramid import PyramidLevel

    torch.set_num_threads(os.cpu_count() or 1)

    class SameConv(nn.Conv2d):
        """Keras 'same' padding: with stride 2 the extra row and column go after."""

        def forward(self, x):
            k, s = self.kernel_size[0], self.stride[0]
            if k > 1 and s > 1:
                pads = []
                for size in (x.shape[3], x.shape[2]):
                    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            return super().forward(x)

    def conv(cin, cout, k, stride=1):
        return SameConv(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0)

    class Block(nn.Module):
        def __init__(self, cin, width, cout, stride):
            super().__init__()
            self.branch2a, self.bn2a = conv(cin, width, 1, stride), nn.BatchNorm2d(width, eps=1e-3)
            self.branch2b, self.bn2b = conv(width, width, 3), nn.BatchNorm2d(width, eps=1e-3)
            self.branch2c, self.bn2c = conv(width, cout, 1), nn.BatchNorm2d(cout, eps=1e-3)
            self.projection = cin != cout or stride != 1
            if self.projection:
                self.branch1, self.bn1 = conv(cin, cout, 1, stride), nn.BatchNorm2d(cout, eps=1e-3)

        def forward(self, x):
            y = torch.relu(self.bn2a(self.branch2a(x)))
            y = torch.relu(self.bn2b(self.branch2b(y)))
            y = self.bn2c(self.branch2c(y))
            return torch.relu(y + (self.bn1(self.branch1(x)) if self.projection else x))

    class Delf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn_conv1 = conv(3, 64, 7, 2), nn.BatchNorm2d(64, eps=1e-3)
            cin = 64
            for stage, blocks, width, stride in (("2", 3, 64, 1), ("3", 4, 128, 2), ("4", 6, 256, 2)):
                for index in range(blocks):
                    self.add_module(f"res{stage}{'abcdef'[index]}", Block(cin, width, 4 * width,
                                                                         stride if index == 0 else 1))
                    cin = 4 * width
            self.attention_conv1, self.attention_bn = conv(1024, 512, 1), nn.BatchNorm2d(512, eps=1e-3)
            self.attention_conv2 = conv(512, 1, 1)

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.bn_conv1(self.conv1(x))), 3, 2)
            for name, block in self.named_children():
                if name.startswith("res"):
                    x = block(x)
            block3 = x[:, :, ::2, ::2]
            attention = torch.relu(self.attention_bn(self.attention_conv1(block3)))
            return F.softplus(self.attention_conv2(attention)), block3

    model = Delf().eval()
    renames = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
    state = {}
    with np.load(weights_path) as arrays:
        for name in arrays.files:
            parts = name.replace("backbone.", "").split(".")
            parts = [part for part in parts if not part.startswith("stage")]
            if parts[0] == "attention":
                parts = [{"conv1": "attention_conv1", "bn_conv1": "attention_bn", "conv2": "attention_conv2"}[parts[1]],
                         parts[2]]
            if parts[0].startswith("res") and parts[0][3] == "5":
                continue  # stage 5 (block4) is not part of the extraction network
            parts[-1] = renames.get(parts[-1], parts[-1])
            state[".".join(parts)] = torch.from_numpy(arrays[name])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"PyTorch model: no weights for {missing[:5]}, unknown weights {unexpected[:5]}")

    def run(levels):
        outputs = []
        with torch.inference_mode():
            for level in levels:
                attention, features = model(torch.from_numpy(level.image))
                outputs.append(PyramidLevel(level.scale, level.scale_yx, attention.numpy()[0, 0],
                                            features.contiguous().numpy()[0]))
        return outputs

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
    if variant == "weights":
        _write_weights(weights_path)
        return
    model = None
    if variant == "torch":
        run = torch_network(weights_path)
    else:
        run, model = mindspore_network(variant, str(Path(weights_path).with_suffix(".ckpt")))

    def handle(job):
        if job["cmd"] == "run":  # network seconds per image over the pyramids of the given images
            times = []
            for height, width, seed in job["images"]:
                levels = pyramid(height, width, job["scales"], seed)
                started = time.perf_counter()
                run(levels)
                times.append(time.perf_counter() - started)
            return times
        if job["cmd"] == "outputs":  # outputs of given input shapes, for the equality check
            import numpy as np

            from src.extraction.pyramid import LevelInput

            arrays = {}
            for index, (height, width) in enumerate(job["shapes"]):
                image = np.random.default_rng(index).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
                (level,) = run([LevelInput(1.0, (1.0, 1.0), image)])
                arrays[f"attention{index}"], arrays[f"block3_{index}"] = level.attention, level.features
            np.savez(job["path"], **arrays)
            return None
        if job["cmd"] == "pipeline":
            return pipeline_seconds(model, job["photos"], job["depth"], job["scales"], job["max_side"])
        if job["cmd"] == "peak_memory":
            return peak_rss_gb()
        raise ValueError(f"unknown job {job}")

    serve(handle)


# ------------------------------------------------------------------ parent

def save_random_weights(path: Path) -> None:
    """Seeded random DelfModel("test") weights (as tests/conftest.py): `path` (.npz, for PyTorch) and
    the same as a MindSpore checkpoint beside it (.ckpt, loaded as extraction loads one)."""
    import subprocess

    subprocess.run([sys.executable, __file__, "--worker", "weights", "--weights", str(path)], check=True,
                   env={**os.environ, "GLOG_v": "3"})


def _write_weights(path: str) -> None:
    import mindspore
    import numpy as np

    from model_utils.device import setup_device
    from src.model.network import KERAS1_BN_EPSILON, DelfModel

    setup_device("CPU", graph_mode=False)
    mindspore.set_seed(0)
    model = DelfModel("test")
    np.savez(path, **{param.name: param.asnumpy() for param in model.get_parameters()})
    mindspore.save_checkpoint(model, str(Path(path).with_suffix(".ckpt")),
                              append_dict={"bn_epsilon": KERAS1_BN_EPSILON})


def check_outputs(workers: dict[str, Worker], folder: Path) -> None:
    import numpy as np

    outputs = {}
    for name, w in workers.items():
        path = folder / f"check_{name}.npz"
        w.ask(cmd="outputs", shapes=CHECK_SHAPES, path=str(path))
        with np.load(path) as arrays:
            outputs[name] = dict(arrays)
    reference = "torch" if "torch" in outputs else next(iter(outputs))
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
        print(f"  {name:20s} attention {worst['attention']:.3g}, block3 {worst['block3']:.3g}")


def workload_sizes(args, round_index: int) -> dict[str, list[tuple[int, int]]]:
    mixed = mixed_sizes(args.images, 1000 + round_index, args.min_side, args.max_side)
    workloads = {"mixed": mixed}
    if args.same_size:  # one size: the mean pixel count and aspect of the first mixed set
        first = mixed_sizes(args.images, 1000, args.min_side, args.max_side)
        mean_area = statistics.mean(h * w for h, w in first)
        aspect = statistics.mean(w / h for h, w in first)
        same_h = int(round(math.sqrt(mean_area / aspect)))
        workloads["same"] = [(same_h, int(round(mean_area / same_h)))] * args.images
    return workloads


def run_rounds(workers: dict[str, Worker], args, scales: list[float]) -> dict:
    """{variant: {workload: [per-round list of per-image seconds]}}, image by image in turn."""
    results = {name: {} for name in workers}
    names = list(workers)
    for round_index in range(args.rounds):
        sizes = workload_sizes(args, round_index)
        for name in names:
            for workload in sizes:
                results[name].setdefault(workload, []).append([])
        for index in range(args.images):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in [name for name in order if name in names]:
                for workload, workload_sizes_ in sizes.items():
                    height, width = workload_sizes_[index]
                    try:
                        seconds = workers[name].ask(cmd="run", images=[(height, width, 100 * round_index + index)],
                                                    scales=scales)[0]
                    except RuntimeError as error:  # e.g. killed for memory on a shared machine: go on without it
                        print(f"{error}; its results so far are kept", flush=True)
                        names.remove(name)
                        break
                    results[name][workload][-1].append(seconds)
            cells = [f"{name} " + "/".join(f"{results[name][w][-1][-1]:.2f}" for w in sizes
                                           if len(results[name][w][-1]) == index + 1) for name in names]
            unit = "s, mixed/same" if args.same_size else "s"
            print(f"round {round_index} image {index} {sizes['mixed'][index]} ({unit}): " + ", ".join(cells),
                  flush=True)
    return results


def run_prefetch(workers: dict[str, Worker], args, scales: list[float]) -> dict | None:
    runner = workers.get("graph")
    if runner is None:
        print("prefetch A/B skipped: it runs in the graph worker")
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
    return {"photos": len(photos), "seconds": seconds}


def report(results: dict, warm_up: dict, memory: dict, pipeline: dict | None, args, scales: list[float]) -> None:
    workloads = list(workload_sizes(args, 0))
    mixed_pixels = statistics.mean(pyramid_pixels(h, w, scales) for r in range(args.rounds)
                                   for h, w in workload_sizes(args, r)["mixed"])
    print(f"\n{args.images} images per round, {args.rounds} round(s), scales {scales}; sides {args.min_side}-"
          f"{args.max_side} px (mean pyramid {mixed_pixels / 1e6:.2f} M pixels, largest level at most 3.5 M)")
    print(machine_description())
    print("s/image: mean over the images after the first of each round, median over rounds (network only); "
          "peak RSS: the worker's whole run.")

    def steady(runs: list[list[float]]) -> float | None:
        means = [statistics.mean(run[1:]) for run in runs if len(run) > 1]
        return statistics.median(means) if means else None

    table = {name: {w: steady(r.get(w, [])) for w in workloads} for name, r in results.items()}
    torch = table.get("torch", {})
    graph = table.get("graph", {})

    def cell(value, width, fmt="{:.2f}"):
        return f"{fmt.format(value):>{width}s}" if value is not None else f"{'-':>{width}s}"

    def ratio(a, b):
        return a / b if a and b else None

    header = f"{'variant':20s} {'warm-up s':>9s} {'1st image':>9s}"
    for w in workloads:
        header += f" {w + ' s/img':>12s} {'x torch':>8s} {'x graph':>8s}"
    print(header + f" {'peak RSS GB':>11s}")
    for name, row in table.items():
        first = statistics.median(run[0] for run in results[name]["mixed"] if run) if results[name]["mixed"] else None
        line = f"{name:20s} {cell(warm_up.get(name), 9)} {cell(first, 9)}"
        for w in workloads:
            line += (f" {cell(row[w], 12)} {cell(ratio(row[w], torch.get(w)), 8)}"
                     f" {cell(ratio(row[w], graph.get(w)), 8)}")
        print(line + f" {cell(memory.get(name), 11)}")
    if graph.get("mixed") and torch.get("mixed"):
        value = graph["mixed"] / torch["mixed"]
        print(f"target: graph within 1.0x of PyTorch's time on the same inputs: {value:.2f}x -> "
              f"{'met' if value <= 1.0 else 'MISSED'}")
    if "graph" in memory:
        print(f"target: graph peak RSS <= {MEMORY_TARGET_GB:g} GB: {memory['graph']:.2f} GB -> "
              f"{'met' if memory['graph'] <= MEMORY_TARGET_GB else 'MISSED'}")
    if pipeline:
        off, on = (statistics.median(pipeline["seconds"][d]) for d in (0, 1))
        print(f"whole extraction of {pipeline['photos']} photos at most {args.max_side} px (graph): prefetch off "
              f"{off:.1f} s, on {on:.1f} s, on/off {on / off:.3f} (runs {pipeline['seconds']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per round (the first one is reported apart)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the sizes are new each round)")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="pyramid scales")
    parser.add_argument("--min-side", type=int, default=300, help="smallest image side")
    parser.add_argument("--max-side", type=int, default=1024, help="largest image side")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--same-size", action="store_true",
                        help="also time N images of one size (the mixed set's mean area) to see what new sizes cost")
    parser.add_argument("--check", action="store_true", help="compare the outputs of every variant first")
    parser.add_argument("--prefetch-photos", type=int, default=0,
                        help="real photos extracted with and without prefetching by the graph worker (0: skip)")
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
    if "torch" in variants and not torch_importable():
        print("PyTorch is not importable: no baseline (pip install torch==2.13.0; benchmarks only)")
        variants.remove("torch")
    print(machine_description(), flush=True)

    with tempfile.TemporaryDirectory() as folder:
        weights_path = Path(folder) / "delf_random_weights.npz"
        save_random_weights(weights_path)
        workers = {}
        for name in variants:
            started = time.perf_counter()
            workers[name] = Worker(__file__, name, ["--weights", str(weights_path)], VARIANT_ENV.get(name))
            print(f"started {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        if args.check:
            check_outputs(workers, Path(folder))
        # Warm-up on a size in no workload: graph compiles here (its one compilation).
        warm_up = {name: w.ask(cmd="run", images=[(333, 444, 7)], scales=scales)[0] for name, w in workers.items()}
        results = run_rounds(workers, args, scales)
        pipeline = run_prefetch(workers, args, scales) if args.prefetch_photos > 0 else None
        memory = {}
        for name, w in workers.items():
            if w.alive:
                memory[name] = w.ask(cmd="peak_memory")
                w.close()
    report(results, warm_up, memory, pipeline, args, scales)


if __name__ == "__main__":
    main()
