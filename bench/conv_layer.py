"""Benchmark: one convolution layer, MindSpore vs PyTorch, same shapes and threads: the floor of the network.

Every distinct convolution of the extraction network (at the 1024x768 pyramid level of scale 1.0,
plus the 3x3 256->256 at 120x160 that the issue quotes), float32, batch 1, timed alone in each of
these workers (one process each: oneDNN reads its ISA cap once):
  - ms_avx2:        MindSpore native Conv2D, oneDNN capped at AVX2 (what model_utils/device.py sets);
  - ms_avx512:      MindSpore native Conv2D, oneDNN uncapped (AVX-512 on this CPU);
  - ms_matmul_avx2 / ms_matmul_avx512: the im2col + MatMul formulation (Conv2d impl "matmul");
  - torch / torch_avx2: PyTorch's F.conv2d, default and capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
                    ATEN_CPU_CAPABILITY=avx2).
MindSpore runs the layer as a graph-mode Cell (static shape), as extraction does. The workers take
turns shape by shape. With --kernels, each variant is first run once with ONEDNN_VERBOSE=1 to show
the oneDNN implementation it gets per shape (`ref` is oneDNN's reference kernel).

    python bench/conv_layer.py [--repeats 5] [--rounds 2] [--variants ms_avx2,ms_avx512,torch,torch_avx2] [--kernels]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import Worker, machine_description, serve, torch_importable

ROOT = Path(__file__).resolve().parents[1]
# (input channels, output channels, kernel, stride, input height, width, times in the network at this size)
SHAPES = (
    (256, 256, 3, 1, 120, 160, 0),  # the reference shape
    (3, 64, 7, 2, 768, 1024, 1),
    (64, 64, 1, 1, 191, 255, 1),
    (64, 64, 3, 1, 191, 255, 3),
    (64, 256, 1, 1, 191, 255, 4),
    (256, 64, 1, 1, 191, 255, 2),
    (256, 128, 1, 2, 191, 255, 1),
    (128, 128, 3, 1, 96, 128, 4),
    (128, 512, 1, 1, 96, 128, 4),
    (256, 512, 1, 2, 191, 255, 1),
    (512, 128, 1, 1, 96, 128, 3),
    (512, 256, 1, 2, 96, 128, 1),
    (256, 256, 3, 1, 48, 64, 6),
    (256, 1024, 1, 1, 48, 64, 6),
    (512, 1024, 1, 2, 96, 128, 1),
    (1024, 256, 1, 1, 48, 64, 5),
    (1024, 512, 1, 1, 24, 32, 1),
)
VARIANTS = {
    "ms_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ms_avx512": {"ONEDNN_MAX_CPU_ISA": "ALL"},
    "ms_matmul_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ms_matmul_avx512": {"ONEDNN_MAX_CPU_ISA": "ALL"},
    "torch": {},
    "torch_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
# Not ms_avx512: oneDNN's reference kernel for every conv but 1x1 stride 1 (--kernels), many seconds each.
DEFAULT_VARIANTS = ("ms_avx2", "ms_matmul_avx2", "ms_matmul_avx512", "torch", "torch_avx2")


def output_side(size: int, kernel: int, stride: int) -> int:
    return -(-size // stride) if kernel > 1 else (size - 1) // stride + 1


def gflop(shape) -> float:
    cin, cout, k, stride, height, width, _ = shape
    return 2 * cin * cout * k * k * output_side(height, k, stride) * output_side(width, k, stride) / 1e9


def mindspore_layer(variant: str):
    import mindspore
    import numpy as np
    from mindspore import Tensor

    from model_utils.device import setup_device
    from src.model.network import Conv2d

    setup_device("CPU", graph_mode=True)
    layers = {}

    def run(shape, repeats):
        cin, cout, k, stride, height, width, _ = shape
        key = tuple(shape[:4])
        if key not in layers:
            mindspore.set_seed(0)
            layers[key] = Conv2d(cin, cout, k, stride, "same" if k > 1 else "valid",  # as the network's
                                 impl="matmul" if "matmul" in variant else "native", has_bias=False)
        images = Tensor(np.random.default_rng(0).uniform(-1, 1, (1, cin, height, width)).astype(np.float32))
        layers[key](images).asnumpy()  # compile for this shape
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            layers[key](images).asnumpy()
            seconds.append(time.perf_counter() - started)
        return min(seconds)

    return run


def torch_layer():
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)

    def run(shape, repeats):
        cin, cout, k, stride, height, width, _ = shape
        torch.manual_seed(0)
        weight = torch.randn(cout, cin, k, k) * 0.05
        images = torch.rand(1, cin, height, width) * 2 - 1
        padding = k // 2  # the output size of 'same' (the padded rows may differ: only the time counts here)
        seconds = []
        with torch.inference_mode():
            F.conv2d(images, weight, None, stride, padding)
            for _ in range(repeats):
                started = time.perf_counter()
                F.conv2d(images, weight, None, stride, padding).numpy()
                seconds.append(time.perf_counter() - started)
        return min(seconds)

    return run


def worker(variant: str) -> None:
    sys.path.insert(0, str(ROOT))
    run = torch_layer() if variant.startswith("torch") else mindspore_layer(variant)
    serve(lambda job: run(job["shape"], job["repeats"]))


def kernels(variant: str) -> dict[str, str]:
    """oneDNN implementation per problem for a variant (one run of every shape with ONEDNN_VERBOSE=1)."""
    env = {**os.environ, "GLOG_v": "3", "ONEDNN_VERBOSE": "1", **VARIANTS[variant]}
    done = subprocess.run([sys.executable, __file__, "--kernel-probe", variant], capture_output=True, text=True,
                          env=env, check=False)
    found = {}
    for line in done.stdout.splitlines():
        fields = line.split(",")
        if len(fields) > 8 and fields[2:4] == ["primitive", "exec"] and fields[5] in ("convolution", "matmul"):
            found.setdefault(fields[-2], fields[6])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape per round (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations (median over rounds)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--kernels", action="store_true", help="show the oneDNN kernel of each variant and shape")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kernel-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.kernel_probe:
        sys.path.insert(0, str(ROOT))
        run = torch_layer() if args.kernel_probe.startswith("torch") else mindspore_layer(args.kernel_probe)
        for shape in SHAPES:
            run(shape, 1)
        return
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"variants must be among {', '.join(VARIANTS)}")
    if any(v.startswith("torch") for v in variants) and not torch_importable():
        print("PyTorch is not importable: no baseline (pip install torch==2.13.0; benchmarks only)")
        variants = [v for v in variants if not v.startswith("torch")]
    print(machine_description(), flush=True)
    if args.kernels:
        for variant in variants:
            print(f"oneDNN kernels, {variant}:")
            for problem, implementation in kernels(variant).items():
                print(f"  {implementation:45s} {problem}")
    workers = {name: Worker(__file__, name, [], VARIANTS[name]) for name in variants}
    seconds = {name: {} for name in variants}
    for round_index in range(args.rounds):
        for index, shape in enumerate(SHAPES):
            order = variants[index % len(variants):] + variants[:index % len(variants)]
            for name in order:
                seconds[name].setdefault(shape, []).append(workers[name].ask(shape=list(shape), repeats=args.repeats))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    for w in workers.values():
        w.close()

    print(f"\nGFLOP/s per convolution (fastest of {args.repeats} calls, median of {args.rounds} rounds), batch 1, "
          f"{os.cpu_count()} threads")
    print(f"{'cin->cout k/s at HxW':28s} {'GFLOP':>6s} " + " ".join(f"{name:>16s}" for name in variants))
    totals = dict.fromkeys(variants, 0.0)
    for shape in SHAPES:
        cin, cout, k, stride, height, width, count = shape
        medians = {name: statistics.median(seconds[name][shape]) for name in variants}
        for name in variants:
            totals[name] += count * medians[name]
        label = f"{cin}->{cout} {k}x{k}/{stride} at {height}x{width}"
        print(f"{label:28s} {gflop(shape):6.2f} " + " ".join(f"{gflop(shape) / medians[name]:16.0f}"
                                                            for name in variants))
    print("network's convolutions at the 1024x768 level (each shape x its count), seconds: "
          + ", ".join(f"{name} {total:.3f}" for name, total in totals.items()))
    if "torch" in totals:
        ratios = ", ".join(f"{name} {total / totals['torch']:.2f}" for name, total in totals.items())
        print(f"  ratio to torch: {ratios}")


if __name__ == "__main__":
    main()
