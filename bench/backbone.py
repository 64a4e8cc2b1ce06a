"""Benchmark: ResNet50-to-block3 forward on CPU, each convolution path and execution mode.

Measures, in one run, the block3 forward at 321x321 for: native kernels with oneDNN capped at AVX2
(our CPU default), native kernels uncapped (MindSpore's out-of-the-box CPU behaviour), and the
im2col + matmul fallback; each in graph and PyNative mode; plus PyTorch running the same network as
the baseline when it is importable. Every variant runs in its own process (oneDNN reads its ISA cap
once) and the variants are interleaved over several rounds, so a noisy machine hits them alike;
medians are printed as ratios to PyTorch and to the uncapped native path.

Whole pyramids are bench/extract_throughput.py's job (persistent workers, image by image in turn,
sizes up to 1024 px); this benchmark's former 640x480-pyramid row was dropped: its PyTorch figure
(13.0 s) had been measured while other jobs ran (re-measured quiet: 2.7-3.8 s).

    python bench/backbone.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from harness import machine_description, torch_importable

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- children (one variant each)

def _time_mindspore(impl: str, graph: bool, sizes: list[tuple[int, int]], repeats: int) -> dict:
    import time

    import mindspore
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from src.model.network import DelfModel

    mindspore.set_device("CPU")
    mindspore.set_context(mode=mindspore.GRAPH_MODE if graph else mindspore.PYNATIVE_MODE)
    mindspore.set_seed(0)
    model = DelfModel("test", conv_impl=impl)
    model.set_train(False)
    rng = np.random.default_rng(0)
    inputs = [mindspore.Tensor(rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32)) for h, w in sizes]
    started = time.perf_counter()
    for images in inputs:  # first call per shape: graph compilation in graph mode
        model(images)[1].asnumpy()
    first = time.perf_counter() - started
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for images in inputs:
            model(images)[1].asnumpy()
        runs.append(time.perf_counter() - started)
    return {"seconds": statistics.median(runs), "first_call": first}


def _time_torch(sizes: list[tuple[int, int]], repeats: int) -> dict:
    import time

    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    def conv_bn(cin, cout, k, stride=1):
        return [nn.Conv2d(cin, cout, k, stride, padding=k // 2), nn.BatchNorm2d(cout, eps=1e-3)]

    class Block(nn.Module):
        def __init__(self, cin, width, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, width, 1, stride), nn.ReLU(),
                                      *conv_bn(width, width, 3), nn.ReLU(), *conv_bn(width, cout, 1))
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if cin != cout or stride != 1 else None

        def forward(self, x):
            return torch.relu(self.body(x) + (self.shortcut(x) if self.shortcut is not None else x))

    layers = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2)]
    cin = 64
    for blocks, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2)):
        for index in range(blocks):
            layers.append(Block(cin, width, 4 * width, stride if index == 0 else 1))
            cin = 4 * width
    model = nn.Sequential(*layers).eval()
    inputs = [torch.rand(1, 3, h, w) * 2 - 1 for h, w in sizes]
    runs = []
    with torch.no_grad():
        for images in inputs:
            model(images)
        for _ in range(repeats):
            started = time.perf_counter()
            for images in inputs:
                model(images)[:, :, ::2, ::2].numpy()
            runs.append(time.perf_counter() - started)
    return {"seconds": statistics.median(runs), "first_call": None}


def _child(spec: dict) -> None:
    sizes = [tuple(size) for size in spec["sizes"]]
    if spec["framework"] == "torch":
        result = _time_torch(sizes, spec["repeats"])
    else:
        result = _time_mindspore(spec["impl"], spec["graph"], sizes, spec["repeats"])
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent

def _run(spec: dict, env_updates: dict) -> dict | None:
    env = {**os.environ, "GLOG_v": "3", **env_updates}
    if "ONEDNN_MAX_CPU_ISA" in env_updates and env_updates["ONEDNN_MAX_CPU_ISA"] is None:
        env.pop("ONEDNN_MAX_CPU_ISA")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  variant {spec} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (median)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats inside each run")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    workloads = {"321x321": [(321, 321)]}
    rounds = 1 if args.quick else args.rounds
    variants = {
        "native, oneDNN AVX2 cap, graph": ({"framework": "ms", "impl": "native", "graph": True},
                                           {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
        "native, oneDNN AVX2 cap, pynative": ({"framework": "ms", "impl": "native", "graph": False},
                                              {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
        "im2col+matmul, graph": ({"framework": "ms", "impl": "matmul", "graph": True}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
        "im2col+matmul, pynative": ({"framework": "ms", "impl": "matmul", "graph": False},
                                    {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
        # MindSpore out of the box: about 25 s per 321x321 forward, so only that size, once.
        "native, uncapped (MindSpore default), pynative": ({"framework": "ms", "impl": "native", "graph": False},
                                                           {"ONEDNN_MAX_CPU_ISA": None}),
    }
    if torch_importable():
        variants["PyTorch (baseline)"] = ({"framework": "torch"}, {})
    else:
        print("PyTorch not importable: no baseline column (pip install torch==2.13.0 to add it)")

    print(machine_description())
    print(f"ResNet50 to block3, batch 1, float32, {os.cpu_count()} CPU threads; median of {rounds} "
          f"round(s) x {args.repeats} repeats\n")
    for workload, sizes in workloads.items():
        times: dict[str, list[float]] = {name: [] for name in variants}
        first_calls: dict[str, float] = {}
        for _ in range(rounds):
            for name, (spec, env) in variants.items():
                if "uncapped" in name and times[name]:
                    continue
                result = _run({**spec, "sizes": sizes, "repeats": 1 if "uncapped" in name else args.repeats}, env)
                if result:
                    times[name].append(result["seconds"])
                    if result["first_call"] is not None:
                        first_calls[name] = result["first_call"]
        medians = {name: statistics.median(values) for name, values in times.items() if values}
        torch_time = medians.get("PyTorch (baseline)")
        slow_time = medians.get("native, uncapped (MindSpore default), pynative")
        print(f"== {workload}")
        print(f"{'variant':48s} {'seconds':>9s} {'first call':>11s} {'x PyTorch':>10s} {'speed-up vs default':>20s}")
        for name, seconds in medians.items():
            first = f"{first_calls[name]:.2f}" if name in first_calls else "-"
            vs_torch = f"{seconds / torch_time:.2f}" if torch_time else "-"
            vs_default = f"{slow_time / seconds:.1f}x" if slow_time and workload == "321x321" else "-"
            print(f"{name:48s} {seconds:9.3f} {first:>11s} {vs_torch:>10s} {vs_default:>20s}")
        print()


if __name__ == "__main__":
    main()
