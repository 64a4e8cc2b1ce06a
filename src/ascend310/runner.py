"""Ascend-310 path, step 2 on any machine: the exported MindIR over the preprocess files.

Does what ascend310_infer/src/main.cc does, with MindSpore's Python API (mindspore.load +
nn.GraphCell), so the whole 310 path runs without an Ascend device:

- takes the finished input files `<stem>_<H>x<W>.bin` (raw float32, (1, 3, H, W)) of the input
  directory in name order, runs the network, writes `<stem>_<H>x<W>_attention.bin` (1, 1, h, w)
  and `..._features.bin` (1, D, h, w) atomically into the output directory, and deletes the input;
- the model for an H x W input is `<prefix>_<H>x<W>.mindir` when export.py wrote that static
  model, else the dynamic-shape `<prefix>.mindir` (prefix = MINDIR path without `.mindir`);
- it waits for more input until preprocess's DONE marker is there and the directory is empty,
  then writes its own DONE marker into the output directory for src/postprocess.py.

    python -m src.infer_mindir --mindir_path DELF_MindIR.mindir --input_path WORK/inputs \
        --output_path WORK/outputs
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import numpy as np

from model_utils.cli import InputError, cli_main
from model_utils.files import require_writable_dir
from src.ascend310.preprocess import DEFAULT_WAIT_TIMEOUT, DONE_MARKER, POLL_INTERVAL
from src.model.export import load_mindir
from src.model.weights import checkpoint_id

LOGGER = logging.getLogger("delf.infer_mindir")

INPUT_NAME = re.compile(r"^(?P<stem>[^.].*)_(?P<height>\d+)x(?P<width>\d+)\.bin$")
OUTPUT_SUFFIXES = ("_attention.bin", "_features.bin")  # the network's outputs, in order


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


def model_id(mindir_path: str | Path) -> str:
    """Identifies the exported weights in the features' settings hash, as checkpoint_id does a .ckpt."""
    return ";".join(checkpoint_id(str(path)) for path in model_files(mindir_path))


class ModelSet:
    """The models of one export, loaded on first use: a static one per input shape, or the dynamic one."""

    def __init__(self, mindir_path: str | Path) -> None:
        self.files = model_files(mindir_path)
        self.prefix = mindir_prefix(mindir_path)
        self._loaded = {}
        dynamic = Path(self.prefix + ".mindir")
        if dynamic in self.files:
            self._loaded[dynamic] = load_mindir(dynamic)  # fail now on a corrupt file, not at the first image

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


def parse_input_name(name: str) -> tuple[str, int, int] | None:
    """(stem, H, W) of an input file name `<stem>_<H>x<W>.bin`; None for other names."""
    match = INPUT_NAME.match(name)
    return (match["stem"], int(match["height"]), int(match["width"])) if match else None


def read_input(path: Path, height: int, width: int) -> np.ndarray:
    """One (1, 3, H, W) float32 input file, its size checked."""
    data = np.fromfile(path, dtype=np.float32)
    if data.size != 3 * height * width:
        raise InputError(f"{path}: {data.size * 4} bytes, expected {3 * height * width * 4} for a float32 "
                         f"1x3x{height}x{width} input (truncated or not written by src.preprocess?)")
    return data.reshape(1, 3, height, width)


def infer_file(models: ModelSet, input_path: Path, output_dir: Path) -> list[Path]:
    """Run one input file, write its outputs atomically, delete it; returns the output paths."""
    from mindspore import Tensor

    from src.extraction.store import atomic_output

    parsed = parse_input_name(input_path.name)
    if parsed is None:
        raise InputError(f"{input_path}: not an input file name <stem>_<H>x<W>.bin")
    _, height, width = parsed
    outputs = models.for_shape(height, width)(Tensor(read_input(input_path, height, width)))
    written = []
    for output, suffix in zip(outputs, OUTPUT_SUFFIXES, strict=True):
        target = output_dir / (input_path.name[: -len(".bin")] + suffix)
        with atomic_output(target) as temporary, open(temporary, "wb") as stream:
            stream.write(np.ascontiguousarray(output.asnumpy(), dtype=np.float32).tobytes())
        written.append(target)
    input_path.unlink()
    return written


def pending_inputs(input_dir: Path) -> list[Path]:
    """Finished input files, in name order (temporaries start with '.', which glob skips)."""
    return sorted(input_dir.glob("*.bin"))


def run_inference(mindir_path: str | Path, input_dir: str | Path, output_dir: str | Path,
                  wait_timeout: float = DEFAULT_WAIT_TIMEOUT, progress: bool = True) -> int:
    """Consume every input file until preprocess is done; returns the number of files run."""
    from tqdm import tqdm

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = ModelSet(mindir_path)
    count, idle_since = 0, time.monotonic()
    with tqdm(desc="infer", unit="level", disable=not progress) as bar:
        while True:
            files = pending_inputs(input_dir)
            for path in files:
                infer_file(models, path, output_dir)
                count += 1
                bar.update()
            if files:
                idle_since = time.monotonic()
                continue
            if (input_dir / DONE_MARKER).exists() and not pending_inputs(input_dir):
                break
            if time.monotonic() - idle_since > wait_timeout:
                raise InputError(f"no input in {input_dir} for {wait_timeout:g} s and no {DONE_MARKER} marker "
                                 "from src.preprocess: is it running?")
            time.sleep(POLL_INTERVAL)
    with open(output_dir / DONE_MARKER, "wb"):
        pass
    return count


@cli_main
def main(argv: list[str] | None = None) -> None:
    from model_utils.device import setup_device

    parser = argparse.ArgumentParser(description="Run an exported DELF MindIR over src.preprocess's input files "
                                     "(what ascend310_infer/ does on Ascend 310, on any device).")
    parser.add_argument("--mindir_path", required=True,
                        help="DELF_MindIR.mindir (static <prefix>_<H>x<W>.mindir beside it are used when present)")
    parser.add_argument("--input_path", required=True, help="the preprocess inputs/ directory (files are consumed)")
    parser.add_argument("--output_path", required=True, help="directory for the network outputs")
    parser.add_argument("--device_target", default="auto", help="auto, Ascend, GPU or CPU")
    parser.add_argument("--device_id", type=int, default=0, help="device index")
    parser.add_argument("--wait_timeout", type=float, default=DEFAULT_WAIT_TIMEOUT,
                        help="seconds to wait for new input before giving up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    require_writable_dir(args.output_path)
    setup_device(args.device_target, args.device_id, graph_mode=False)
    count = run_inference(args.mindir_path, args.input_path, args.output_path, args.wait_timeout)
    print(f"{count} level files -> {args.output_path}")


if __name__ == "__main__":
    main()
