"""Ascend-310 path, step 2: the exported network over the input files of a work directory.

Two runners follow the same protocol (src/ascend310/protocol.py): `run_inference` does with
MindSpore's Python API (mindspore.load + nn.GraphCell) on any device what the C++ binary of
ascend310_infer/ does on Ascend 310, and `run_binary` starts that binary. Each runs every input
file present once, writes every output of the network atomically (DELF 2, DELG 3) and deletes it;
a file that fails is reported and skipped, so one bad image does not stop the others.

The model for an H x W input is `<prefix>_<H>x<W>.mindir` when export.py wrote that static
model, else the dynamic-shape `<prefix>.mindir` (prefix = MINDIR path without `.mindir`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import numpy as np
from mindspore import Tensor
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.files import atomic_write_bytes
from src.ascend310.protocol import output_paths, parse_input_name
from src.model.export import exported_network, load_mindir
from src.model.network import NetworkSpec
from src.model.weights import checkpoint_id

LOGGER = logging.getLogger("delf.infer_mindir")


def mindir_prefix(mindir_path: str | Path) -> str:
    """`DELF_MindIR.mindir` or `DELF_MindIR` -> `DELF_MindIR`."""
    text = str(mindir_path)
    return text[: -len(".mindir")] if text.endswith(".mindir") else text


def model_files(mindir_path: str | Path) -> list[Path]:
    """The dynamic `<prefix>.mindir` (when present) and every static `<prefix>_<H>x<W>.mindir`."""
    prefix = Path(mindir_prefix(mindir_path))
    dynamic = prefix.with_name(prefix.name + ".mindir")
    static_name = re.compile(re.escape(prefix.name) + r"_\d+x\d+\.mindir")
    static = sorted(path for path in prefix.parent.glob("*.mindir") if static_name.fullmatch(path.name))
    files = ([dynamic] if dynamic.is_file() else []) + static
    if not files:
        raise InputError(f"MindIR file not found: {dynamic} (nor static models {prefix.name}_<H>x<W>.mindir "
                         f"in {prefix.parent}); write it with export.py")
    return files


def model_network(mindir_path: str | Path) -> NetworkSpec:
    """The network the export was made from: its backbone layout fixes the map size of every input
    size, its kind the outputs."""
    return exported_network(model_files(mindir_path)[0])


def model_id(mindir_path: str | Path) -> str:
    """Identifies the exported weights in the features' settings hash, as checkpoint_id does a .ckpt
    (each file by its name, which says the input size it serves, and its content)."""
    return ";".join(f"{path.name}={checkpoint_id(str(path))}" for path in model_files(mindir_path))


class ModelSet:
    """The models of one export, loaded on first use: a static one per input shape, or the dynamic one."""

    def __init__(self, mindir_path: str | Path) -> None:
        self.files = model_files(mindir_path)
        self.prefix = mindir_prefix(mindir_path)
        self._loaded = {}
        dynamic = Path(self.prefix + ".mindir")
        if dynamic in self.files:
            self._loaded[dynamic] = load_mindir(dynamic)  # fail now on a corrupt file, not at every image

    def path_for(self, height: int, width: int) -> Path:
        static = Path(f"{self.prefix}_{height}x{width}.mindir")
        if static.is_file():
            return static
        dynamic = Path(self.prefix + ".mindir")
        if dynamic.is_file():
            return dynamic
        raise InputError(f"no model for {height}x{width} inputs: neither {static} nor the dynamic {dynamic} exists "
                         "(preprocess --input_mode canvas must use the max_image_size and scales of the export)")

    def for_shape(self, height: int, width: int):
        path = self.path_for(height, width)
        if path not in self._loaded:
            LOGGER.info("loading %s", path)
            self._loaded[path] = load_mindir(path)
        return self._loaded[path]


def read_input(path: Path, height: int, width: int) -> np.ndarray:
    """One (1, 3, H, W) float32 input file, its size checked."""
    data = np.fromfile(path, dtype=np.float32)
    if data.size != 3 * height * width:
        raise InputError(f"{path}: {data.size * 4} bytes, expected {3 * height * width * 4} for a float32 "
                         f"1x3x{height}x{width} input (truncated or not written by src.preprocess?)")
    return data.reshape(1, 3, height, width)


def infer_file(models: ModelSet, input_path: Path, output_dir: Path) -> None:
    """Run one input file, write its outputs atomically, delete it."""
    parsed = parse_input_name(input_path.name)
    if parsed is None:
        raise InputError(f"{input_path}: not an input file name <stem>_<H>x<W>.bin")
    _, height, width = parsed
    outputs = models.for_shape(height, width)(Tensor(read_input(input_path, height, width)))
    for output, target in zip(outputs, output_paths(output_dir, input_path.name, len(outputs)), strict=True):
        atomic_write_bytes(target, np.ascontiguousarray(output.asnumpy(), dtype=np.float32).tobytes())
    input_path.unlink()


def run_inference(models: ModelSet | str | Path, input_dir: str | Path, output_dir: str | Path,
                  progress: bool = True) -> dict[str, str]:
    """Run every input file of `input_dir` (MindIR path or loaded models); returns failed file name -> reason."""
    if not isinstance(models, ModelSet):
        models = ModelSet(models)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    failed = {}
    for path in tqdm(sorted(input_dir.glob("*.bin")), desc="infer", unit="level", disable=not progress):
        try:
            infer_file(models, path, output_dir)
        except (InputError, MemoryError, RuntimeError, ValueError) as error:
            failed[path.name] = " ".join(str(error).split())
            LOGGER.error("%s", failed[path.name])
    return failed


def run_binary(binary: str | Path, mindir_path: str | Path, device_id: int, input_dir: str | Path,
               output_dir: str | Path) -> dict[str, str]:
    """`run_inference` through the C++ runner (ascend310_infer/out/main); returns failed file name -> reason.

    The binary exits 0, 1 when some input files failed (one line `error: <input path>: <reason>`
    each on stderr), or 2 when it could not run at all.
    """
    if not os.access(binary, os.X_OK):
        raise InputError(f"C++ runner not found or not executable: {binary} (build it with ascend310_infer/build.sh)")
    result = subprocess.run([str(binary), f"--mindir_path={mindir_path}", f"--input_path={input_dir}",
                             f"--output_path={output_dir}", f"--device_id={device_id}"],
                            capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        LOGGER.info("%s", line)
    errors = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.returncode != 0 and (result.returncode != 1 or not errors):
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"the C++ runner {binary} failed (exit {result.returncode}): {last}")
    failed = {}
    for error in errors:
        LOGGER.error("%s", error)
        failed[Path(error.split(": ", 1)[0]).name] = error
    return failed

