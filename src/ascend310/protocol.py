r"""The files the Ascend-310 stages hand over in a work directory (the runner's side: ascend310_infer/inc/utils.h).

    <work>/inputs/<image>_l<level>_<H>x<W>.bin    raw float32 (1, 3, H, W), written by preprocess,
                                                  deleted by the runner once its outputs are written
    <work>/outputs/<image>_l<level>_<H>x<W>_attention.bin  (1, 1, h, w)  \  the runner's outputs,
    <work>/outputs/<image>_l<level>_<H>x<W>_features.bin   (1, D, h, w)   | in the network's order:
    <work>/outputs/<image>_l<level>_<H>x<W>_global.bin     (1, G)        /  DELF gives 2, DELG all 3
    <work>/manifest.json                          what postprocess needs to turn outputs into features

The manifest lists every image of the run: {image_id, store, path} and either {image_size, levels:
[{input_file, scale, scale_yx, resize_yx, size}]} or {error} when preprocess could not prepare it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from model_utils.cli import InputError
from model_utils.files import atomic_write_text, directory_lock

INPUTS_DIR = "inputs"
OUTPUTS_DIR = "outputs"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "delf-310-v3"  # v3: levels carry resize_yx (src/extraction/geometry.py)
# Every output of the network, in its order: attention, local descriptors, and DELG's raw global descriptor.
OUTPUT_SUFFIXES = ("_attention.bin", "_features.bin", "_global.bin")
OUTPUT_COUNTS = {"delf": 2, "delg": 3}  # outputs of the exported network of each model kind
OWNER_NAME = ".owner"  # who holds the work folder, while a run holds it
INPUT_NAME = re.compile(r"^(?P<stem>[^.].*)_(?P<height>\d+)x(?P<width>\d+)\.bin$")


def input_name(image_number: int, level_index: int, height: int, width: int) -> str:
    return f"{image_number:06d}_l{level_index}_{height}x{width}.bin"


def parse_input_name(name: str) -> tuple[str, int, int] | None:
    """(stem, H, W) of an input file name `<stem>_<H>x<W>.bin`; None for other names."""
    match = INPUT_NAME.match(name)
    return (match["stem"], int(match["height"]), int(match["width"])) if match else None


def output_paths(outputs_dir: Path, input_file: str, count: int = 2) -> tuple[Path, ...]:
    """The output files of one input file for a network with `count` outputs: (attention, features)
    or (attention, features, global)."""
    if not 2 <= count <= len(OUTPUT_SUFFIXES):
        raise InputError(f"{input_file}: the network gave {count} outputs; expected 2 (attention, local "
                         "descriptors; DELF) or 3 (and the global descriptor; DELG)")
    stem = input_file[: -len(".bin")]
    return tuple(outputs_dir / (stem + suffix) for suffix in OUTPUT_SUFFIXES[:count])


def write_manifest(work_dir: Path, input_mode: str, images: list[dict]) -> None:
    atomic_write_text(work_dir / MANIFEST_NAME,
                      json.dumps({"format": MANIFEST_FORMAT, "input_mode": input_mode, "images": images}, indent=1))


def read_manifest(work_dir: str | Path) -> dict:
    """The manifest of `work_dir`, checked enough that later errors cannot be cryptic."""
    path = Path(work_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"manifest {path} is unreadable ({error}): run src.preprocess first") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a {MANIFEST_FORMAT} manifest written by src.preprocess")
    for image in manifest["images"]:
        if not image["store"] or Path(image["store"]).name != image["store"]:
            raise InputError(f"manifest {path}: store must be a plain file name, got {image['store']!r}")
    return manifest


@contextlib.contextmanager
def work_dir_lock(work_dir: str | Path) -> Iterator[None]:
    """Hold the work folder for one run. Input files are named by position in the chunk, so two
    runs sharing it would store one run's features under the other's image ids: the second is
    refused with an InputError naming the first (its pid, host, start and command)."""
    work_dir = Path(work_dir)
    owner = work_dir / OWNER_NAME
    held = contextlib.ExitStack()
    try:
        held.enter_context(directory_lock(work_dir, wait=False))
    except BlockingIOError:
        try:
            holder = owner.read_text().strip()
        except OSError:
            holder = "another process"
        raise InputError(f"work folder {work_dir} is in use by another run ({holder}): give each run its own "
                         "--work_path") from None
    with held:
        command = " ".join(sys.argv)[:300]
        atomic_write_text(owner, f"pid {os.getpid()} on {socket.gethostname()}, started "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")
        try:
            yield
        finally:
            owner.unlink(missing_ok=True)


def clear_work_dir(work_dir: str | Path) -> None:
    """Remove a run's inputs, outputs (and temporaries of killed writers) and manifest; other files stay."""
    work_dir = Path(work_dir)
    for folder in (work_dir / INPUTS_DIR, work_dir / OUTPUTS_DIR):
        for path in folder.glob("*"):
            if path.is_file():
                path.unlink()
    (work_dir / MANIFEST_NAME).unlink(missing_ok=True)
