"""Exporting the extraction network (DelfModel "test": image -> attention, block3; DelgModel "test":
image -> attention, local descriptors, raw global descriptor) as MindIR or ONNX, and running an
exported file to check it against the framework.

Input shapes: one dynamic-H/W MindIR (each pyramid level at its own size, exactly the features of
direct extraction), or one static model per distinct (H, W) for devices that need fixed shapes
(Ascend 310) and for ONNX, whose MindSpore exporter has no dynamic shapes. The network always uses
MindSpore's native convolutions. A MindIR records its network (user_info "model_kind", "backbone",
"backbone_depth"; `exported_network`): the backbone layout tells the 310 postprocess the size of
the maps, the kind which outputs there are.
"""

from __future__ import annotations

from pathlib import Path

import mindspore
import numpy as np
from mindspore import Tensor, nn

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.model.network import NetworkSpec, Softplus

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}
INPUT_SHAPES = ("auto", "dynamic", "static")


def export_paths(file_name: str | Path, file_format: str = "MINDIR",
                 input_sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """The files export_network writes for these arguments (so a CLI can check them before any work)."""
    if file_format not in FORMATS:
        raise InputError(f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    suffix = FORMATS[file_format]
    base = Path(str(file_name)[: -len(suffix)] if str(file_name).endswith(suffix) else str(file_name))
    if input_sizes is None:
        if file_format != "MINDIR":
            raise InputError("MindSpore's ONNX exporter has no dynamic shapes: use --input_shape static "
                             "(with extraction.max_image_size) for ONNX")
        return [base.with_name(base.name + suffix)]
    return [base.with_name(f"{base.name}_{height}x{width}{suffix}") for height, width in dict.fromkeys(input_sizes)]


def export_network(model, file_name: str | Path, file_format: str = "MINDIR",
                   input_sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """Export `model` (DelfModel or DelgModel "test", native convolutions; every output); returns the written files.

    input_sizes None: one dynamic-H/W model `<file_name>.mindir`; otherwise one static model per
    distinct (H, W), `<file_name>_<H>x<W>.<ext>`.
    """
    suffix = FORMATS.get(file_format, "")
    paths = export_paths(file_name, file_format, input_sizes)
    if input_sizes is None:
        examples = [Tensor(shape=[1, 3, None, None], dtype=mindspore.float32)]
    else:
        examples = [Tensor(np.zeros((1, 3, height, width), np.float32)) for height, width in dict.fromkeys(input_sizes)]
    spec = NetworkSpec(getattr(model, "kind", "delf"), getattr(model, "backbone_name", "keras"),
                       getattr(model, "depth", 50))
    if input_sizes is not None and spec.backbone != "keras":
        # Canvas inputs rely on the Keras stem's padding (src/ascend310/preprocess.place_on_canvas); the
        # slim stem's 'SAME' max-pool would see the canvas padding along the top/left of odd-sized levels.
        raise InputError(f"static input shapes are not supported for the {spec.backbone} backbone (imported TF "
                         "models): export the dynamic MindIR (--input_shape dynamic)")
    if input_sizes is not None and spec.kind == "delg":
        # GeM pools the whole block4 map: the canvas padding around a smaller level would enter the global descriptor.
        raise InputError("static input shapes (canvas inputs) are not supported for a DELG model: its global "
                         "descriptor pools the whole map; export the dynamic MindIR (--input_shape dynamic)")
    model.set_train(False)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    written = []

    def record_network(mindir_model) -> None:
        for key, value in (("model_kind", spec.kind), ("backbone", spec.backbone), ("backbone_depth", spec.depth)):
            mindir_model.user_info[key] = str(value)

    softplus_cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, Softplus)]
    for cell in softplus_cells:
        cell.for_onnx = file_format == "ONNX"
    try:
        for target, example in zip(paths, examples, strict=True):
            extra = {"custom_func": record_network} if file_format == "MINDIR" else {}
            with atomic_output(target, suffix=suffix) as temporary:
                mindspore.export(model, example, file_name=str(temporary), file_format=file_format, **extra)
            written.append(target)
    finally:
        for cell in softplus_cells:
            cell.for_onnx = False
    return written


def exported_network(path: str | Path) -> NetworkSpec:
    """The network a MindIR was exported from (DELF, ResNet50, Keras layout for files that predate the record)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"MindIR file not found: {path}")
    try:
        user_info = mindspore.load_mindir(str(path)).user_info
    except (RuntimeError, ValueError) as error:
        raise InputError(f"{path} is not a readable MindIR file: {str(error).splitlines()[0]}") from None
    try:
        return NetworkSpec(str(user_info.get("model_kind", "delf")), str(user_info.get("backbone", "keras")),
                           int(user_info.get("backbone_depth", 50))).check()
    except ValueError as error:
        raise InputError(f"{path}: records a network this suite does not build: {error}") from None


def exported_backbone(path: str | Path) -> str:
    """The backbone layout a MindIR was exported with ('keras' for files that predate the record)."""
    return exported_network(path).backbone


def load_mindir(path: str | Path):
    """An nn.GraphCell of a MindIR file; InputError naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"MindIR file not found: {path}")
    try:
        graph = mindspore.load(str(path))
    except (RuntimeError, ValueError) as error:
        raise InputError(f"{path} is not a readable MindIR file (corrupt or truncated? export it again "
                         f"with export.py): {str(error).splitlines()[0]}") from None
    return nn.GraphCell(graph)


OUTPUT_NAMES = ("attention", "features", "global")  # the outputs of the "test" networks, in order (DELF: 2)


def run_exported(path: str | Path, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every output of an exported file on a (1, 3, H, W) float32 batch: (attention, features) for
    DELF, (attention, local descriptors, raw global descriptor) for DELG.

    MindIR runs through mindspore.load + nn.GraphCell, ONNX through onnxruntime (a test-only
    dependency, imported here only).
    """
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if path.suffix == ".onnx":
        import onnxruntime  # test-only dependency

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return tuple(session.run(None, {session.get_inputs()[0].name: images}))
    return tuple(output.asnumpy() for output in load_mindir(path)(Tensor(images)))


def max_difference(model, path: str | Path, images: np.ndarray) -> tuple[float, ...]:
    """Largest absolute difference of every output (OUTPUT_NAMES order) between `model` and its export on `images`."""
    model.set_train(False)
    expected = [output.asnumpy() for output in model(Tensor(np.asarray(images, np.float32)))]
    actual = run_exported(path, images)
    if len(actual) != len(expected):
        raise InputError(f"{path}: {len(actual)} outputs, the framework's network has {len(expected)}")
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            raise InputError(f"{path}: output shape {got.shape} differs from the framework's {want.shape}")
    return tuple(float(np.abs(want - got).max()) for want, got in zip(expected, actual, strict=True))
