"""Export the DELF extraction network (DelfModel "test": image -> attention, block3) as MindIR or ONNX.

Input shapes (--input_shape; README "Input shapes for Ascend 310"):

- dynamic (MINDIR default): one `<file_name>.mindir` taking (1, 3, H, W) for any H, W. Run at each
  pyramid level's own size, it gives exactly the features of direct extraction.
- static: one model per pyramid scale, `<file_name>_<S>x<S>.<ext>`, for devices that need fixed
  shapes (Ascend 310) and for ONNX, whose MindSpore exporter has no dynamic shapes. The canvas
  side S of a scale follows from extraction.max_image_size (src.preprocess.canvas_sides);
  `src.preprocess --input_mode canvas` pads every level onto it.

The network always uses MindSpore's native convolutions (the CPU im2col path is for speed in
Python only). Files are written under a temporary name and renamed when complete.

    python export.py --ckpt_path delf.ckpt [--file_name DELF_MindIR] [--file_format MINDIR|ONNX] \
        [--input_shape dynamic|static] [--extraction.max_image_size=1024] [--device_target CPU]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from src.errors import InputError, cli_main

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}
INPUT_SHAPES = ("auto", "dynamic", "static")


def export_network(model, file_name: str | Path, file_format: str = "MINDIR",
                   input_sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """Export `model` (DelfModel "test", native convolutions); returns the written files.

    input_sizes None: one dynamic-H/W model `<file_name>.mindir`; otherwise one static model per
    distinct (H, W), `<file_name>_<H>x<W>.<ext>`.
    """
    import mindspore
    from mindspore import Tensor

    if file_format not in FORMATS:
        raise InputError(f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    suffix = FORMATS[file_format]
    base = Path(str(file_name)[: -len(suffix)] if str(file_name).endswith(suffix) else str(file_name))
    if input_sizes is None:
        if file_format != "MINDIR":
            raise InputError("MindSpore's ONNX exporter has no dynamic shapes: use --input_shape static "
                             "(with extraction.max_image_size) for ONNX")
        targets = [(base.with_name(base.name + suffix), Tensor(shape=[1, 3, None, None], dtype=mindspore.float32))]
    else:
        targets = [(base.with_name(f"{base.name}_{height}x{width}{suffix}"),
                    Tensor(np.zeros((1, 3, height, width), np.float32)))
                   for height, width in dict.fromkeys(input_sizes)]
    model.set_train(False)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for target, example in targets:
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
        try:
            mindspore.export(model, example, file_name=str(temporary), file_format=file_format)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        written.append(target)
    return written


def run_exported(path: str | Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attention, features) of an exported file on a (1, 3, H, W) float32 batch.

    MindIR runs through mindspore.load + nn.GraphCell, ONNX through onnxruntime (a test-only
    dependency, imported here only).
    """
    from mindspore import Tensor

    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        attention, features = session.run(None, {session.get_inputs()[0].name: images})
        return attention, features
    from src.infer_mindir import load_mindir

    attention, features = load_mindir(path)(Tensor(images))
    return attention.asnumpy(), features.asnumpy()


def max_difference(model, path: str | Path, images: np.ndarray) -> tuple[float, float]:
    """Largest absolute differences (attention, features) between `model` and its export on `images`."""
    from mindspore import Tensor

    model.set_train(False)
    expected = [output.asnumpy() for output in model(Tensor(np.asarray(images, np.float32)))]
    actual = run_exported(path, images)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            raise InputError(f"{path}: output shape {got.shape} differs from the framework's {want.shape}")
    return tuple(float(np.abs(want - got).max()) for want, got in zip(expected, actual, strict=True))


def _verification_input(image_path: str, size: tuple[int, int] | None) -> np.ndarray:
    """A photo as network input: at its own size (dynamic) or fitted and padded onto a canvas (static)."""
    from src.delf_model import normalize_images
    from src.image_io import load_image, resize_image
    from src.preprocess import place_on_canvas

    image = load_image(image_path)
    if size is None:
        return normalize_images(image[None])
    factor = min(1.0, (size[0] - 1) / max(image.shape[:2]))
    fitted = resize_image(image, max(1, int(image.shape[0] * factor)), max(1, int(image.shape[1] * factor)))
    return place_on_canvas(normalize_images(fitted[None]), size[0])[0]


@cli_main
def main(argv: list[str] | None = None) -> None:
    from model_utils.config import get_config_and_args
    from model_utils.device import setup_device
    from src.extract_feature import load_extraction_model
    from src.preprocess import canvas_sides

    parser = argparse.ArgumentParser(description="Export the DELF extraction network (image -> attention scores, "
                                     "block3 features) as MindIR or ONNX.")
    parser.add_argument("--ckpt_path", required=True, help="trained DELF checkpoint (.ckpt)")
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
    target = setup_device(config.device_target, config.device_id, graph_mode=False)
    # Native convolutions whatever the device: the exported graph must not carry the im2col path.
    model = load_extraction_model(args.ckpt_path, target, "native", config.bn_epsilon, config.use_autoencoder,
                                  config.autoencoder_dim, config.seed)
    written = export_network(model, args.file_name, args.file_format, sizes)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    if args.verify_image:
        for path, size in zip(written, sizes or [None] * len(written), strict=True):
            difference = max_difference(model, path, _verification_input(args.verify_image, size))
            print(f"{path.name}: largest difference to the framework: attention {difference[0]:.3g}, "
                  f"features {difference[1]:.3g}")


if __name__ == "__main__":
    main()
