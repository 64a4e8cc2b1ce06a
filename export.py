"""Export the DELF or DELG extraction network as MindIR or ONNX: image -> attention, local descriptors
(DELF: block3; DELG: the autoencoder's code) and, for DELG, the raw global descriptor (the checkpoint
records which network it holds).

Input shapes (--input_shape; docs/export-310.md, "Input shapes"):

- dynamic (MINDIR default): one `<file_name>.mindir` taking (1, 3, H, W) for any H, W. Run at each
  pyramid level's own size, it gives exactly the features of direct extraction.
- static (DELF, Keras layout only): one model per pyramid scale, `<file_name>_<S>x<S>.<ext>`, for
  devices that need fixed shapes (Ascend 310) and for ONNX, whose MindSpore exporter has no dynamic
  shapes. DELG refuses it: its global descriptor pools the whole map, canvas padding included. The canvas
  side S of a scale follows from extraction.max_image_size (src/ascend310/preprocess.py canvas_sides);
  `src.preprocess --input_mode canvas` pads every level onto it.

The network always uses MindSpore's native convolutions (the CPU im2col path is for speed in
Python only). Files are written under a temporary name and renamed when complete.

    python export.py --ckpt_path delf.ckpt [--file_name DELF_MindIR] [--file_format MINDIR|ONNX] \
        [--input_shape dynamic|static] [--extraction.max_image_size=1024] [--device_target CPU]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from model_utils.cli import InputError, cli_main
from model_utils.config import get_config_and_args
from model_utils.device import setup_device
from model_utils.files import require_writable
from src.ascend310.preprocess import canvas_sides, place_on_canvas
from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import normalize_images
from src.model.export import FORMATS, INPUT_SHAPES, OUTPUT_NAMES, export_network, export_paths, max_difference
from src.model.weights import build_extraction_model


def _verification_input(image_path: str, size: tuple[int, int] | None) -> np.ndarray:
    """A photo as network input: at its own size (dynamic) or fitted and padded onto a canvas (static)."""
    image = load_image(image_path)
    if size is None:
        return normalize_images(image[None])
    factor = min(1.0, (size[0] - 1) / max(image.shape[:2]))
    fitted = resize_image(image, max(1, int(image.shape[0] * factor)), max(1, int(image.shape[1] * factor)))
    return place_on_canvas(normalize_images(fitted[None]), size[0])[0]


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the DELF or DELG extraction network (image -> attention "
                                     "scores, local descriptors[, global descriptor]) as MindIR or ONNX.")
    parser.add_argument("--ckpt_path", required=True, help="trained DELF or DELG checkpoint (.ckpt)")
    parser.add_argument("--file_name", default="DELF_MindIR", help="output path without suffix")
    parser.add_argument("--file_format", choices=tuple(FORMATS), default="MINDIR", help="MINDIR or ONNX")
    parser.add_argument("--input_shape", choices=INPUT_SHAPES, default="auto",
                        help="dynamic: one MindIR for any H, W; static: one model per pyramid scale, canvas "
                        "from extraction.max_image_size; auto: dynamic for MINDIR, static for ONNX")
    parser.add_argument("--verify_image", default="",
                        help="run framework and export on this photo and print the largest differences")
    config, args = get_config_and_args(argv, parser)
    if not args.ckpt_path:
        raise InputError("--ckpt_path is empty: export needs trained weights")
    input_shape = args.input_shape
    if input_shape == "auto":
        input_shape = "dynamic" if args.file_format == "MINDIR" else "static"
    sizes = None
    if input_shape == "static":
        sizes = list(dict.fromkeys((side, side) for side in canvas_sides(config.extraction)))
    for path in export_paths(args.file_name, args.file_format, sizes):
        require_writable(path, "export file")
    setup_device(config.device_target, config.device_id, graph_mode=False)
    # Native convolutions whatever the device: the exported graph must not carry the im2col path.
    model = build_extraction_model(dataclasses.replace(config, conv_impl="native"), args.ckpt_path)
    written = export_network(model, args.file_name, args.file_format, sizes)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    if args.verify_image:
        for path, size in zip(written, sizes or [None] * len(written), strict=True):
            differences = max_difference(model, path, _verification_input(args.verify_image, size))
            print(f"{path.name}: largest difference to the framework: "
                  + ", ".join(f"{name} {value:.3g}" for name, value in zip(OUTPUT_NAMES, differences, strict=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
