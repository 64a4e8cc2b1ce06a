"""Time of one DELF (or DELG) training step on CPU per stage, graph vs PyNative mode, beside the reference's Ascend
figures.

Each (mode, stage) runs in its own child process (the execution mode is process-wide) on random
images and labels, so data loading is not timed. The first step (graph compilation in graph mode)
is reported separately; the step time is the median of the following `--steps` steps. The network
has GLDv2-clean's 81313 classes by default, as the reference figures: 171 ms/step (tuning) and
156 ms/step (attn) at batch 32 on one Ascend 910 (MindSpore 1.3, amp O3).

    python bench/train_step.py                      # batch 8 x 321 x 321, 2 timed steps, about 5 minutes
    python bench/train_step.py --stages attn --modes graph --steps 3
    python bench/train_step.py --stages tuning delg --modes graph   # DELG's joint step against DELF's tuning
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

ASCEND_910_MS_PER_STEP = {"tuning": 171.0, "attn": 156.0}  # batch 32, MindSpore README_CN
RESULT_TAG = "RESULT "


def child(mode: str, stage: str, batch_size: int, image_size: int, num_classes: int, steps: int) -> None:
    """Time the steps in this process and print one RESULT line of JSON."""
    import mindspore
    import numpy as np

    from model_utils.device import setup_device
    from src.model.delg import DelgModel
    from src.model.network import DelfModel
    from src.training.step import build_train_step

    setup_device("CPU", graph_mode=mode == "graph")
    mindspore.set_seed(0)
    model = DelgModel(stage, num_classes) if stage == "delg" else DelfModel(stage, num_classes, conv_impl="native")
    train_step = build_train_step(model, initial_lr=0.01, max_iters=1000)
    train_step.set_train()
    rng = np.random.default_rng(0)
    images = mindspore.Tensor(rng.uniform(-1, 1, (batch_size, 3, image_size, image_size)).astype(np.float32))
    labels = mindspore.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        float(train_step(images, labels)[0].asnumpy())  # the loss; asnumpy waits for the step to finish
        seconds.append(time.perf_counter() - start)
    print(RESULT_TAG + json.dumps({"first_s": seconds[0], "step_ms": 1000 * statistics.median(seconds[1:])}),
          flush=True)


def run_child(mode: str, stage: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, stage, "--batch_size", str(args.batch_size),
               "--image_size", str(args.image_size), "--num_classes", str(args.num_classes),
               "--steps", str(args.steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    errors = [line for line in done.stderr.splitlines() if "Error" in line and not line.startswith(" ")]
    return {"error": (errors or done.stderr.strip().splitlines() or ["no output"])[-1][:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=321)
    parser.add_argument("--num_classes", type=int, default=81313)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--stages", nargs="+", default=["tuning", "attn"], choices=["tuning", "attn", "delg"])
    parser.add_argument("--modes", nargs="+", default=["graph", "pynative"], choices=["graph", "pynative"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per child")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch_size, args.image_size, args.num_classes, args.steps)
        return

    print(f"Training step on CPU: batch {args.batch_size} x {args.image_size} x {args.image_size}, "
          f"{args.num_classes} classes, median of {args.steps} steps after the first")
    results = {}
    for stage in args.stages:
        for mode in args.modes:
            started = time.perf_counter()
            results[stage, mode] = result = run_child(mode, stage, args)
            outcome = (f"first step {result['first_s']:.1f} s, then {result['step_ms']:.0f} ms/step"
                       if "error" not in result else f"FAILED: {result['error']}")
            print(f"  {stage:6s} {mode:8s} {outcome}  ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\n{'stage':6s} | {'graph ms/step':>13s} | {'pynative ms/step':>16s} | {'pynative/graph':>14s} | "
          f"{'graph compile s':>15s} | Ascend 910, batch 32")
    for stage in args.stages:
        graph, pynative = results.get((stage, "graph"), {}), results.get((stage, "pynative"), {})
        cells = [f"{r['step_ms']:.0f}" if "step_ms" in r else "-" for r in (graph, pynative)]
        ratio = (f"{pynative['step_ms'] / graph['step_ms']:.2f}x" if "step_ms" in graph and "step_ms" in pynative
                 else "-")
        compile_s = f"{graph['first_s'] - graph['step_ms'] / 1000:.0f}" if "step_ms" in graph else "-"
        print(f"{stage:6s} | {cells[0]:>13s} | {cells[1]:>16s} | {ratio:>14s} | {compile_s:>15s} | "
              + (f"{ASCEND_910_MS_PER_STEP[stage]:.0f} ms/step" if stage in ASCEND_910_MS_PER_STEP else "-"))


if __name__ == "__main__":
    main()
