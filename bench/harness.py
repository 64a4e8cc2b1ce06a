"""Shared by the benchmarks: the machine a run measured, and persistent worker processes that take turns.

Every benchmark prints `machine_description()` first: absolute times (and what the oneDNN AVX2 cap
of model_utils/device.py costs) depend on the CPU and its instruction set.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine_description() -> str:
    """One line: CPU model, cores, vector instruction sets, load average, and the oneDNN ISA cap."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2 (model_utils/device.py)")
    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, ISA {' '.join(cpu_flags()) or 'unknown'}; "
            f"load average {load}; MindSpore's oneDNN capped at {cap}")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Worker:
    """A persistent `python SCRIPT --worker NAME ...` child answering JSON jobs line by line: the
    variants of a benchmark live in workers and take turns, so a load change hits them all alike.

    The child prints "READY" once set up, then for every job line on stdin one "RESULT <json>" line.
    """

    def __init__(self, script: str | Path, name: str, arguments: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(script), "--worker", name, *arguments],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "GLOG_v": "3", **(env or {})})
        self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return None
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, **job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve(handle) -> None:
    """The worker side of `Worker`: READY, then handle(job) -> RESULT for every job line."""
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(handle(json.loads(line))), flush=True)


def torch_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, check=False).returncode == 0
