"""Graph-mode input shapes of the extraction network: one compilation for every image size.

In graph mode MindSpore compiles the network for the shape of its input. A pyramid runs the
network at 7 sizes per image, and a data set with many image sizes (Paris6k, GLDv2, R1M) then
recompiles for almost every image (about 7 s per new shape on a 2-core CPU, slower than PyNative
overall). `dynamic` declares the height and width free (`Cell.set_inputs`), so the network is
compiled once, on its first call, for every size; its outputs are bit-identical to the static graph
and to PyNative (bench/extract_throughput.py --check). `static` keeps one compilation per input
shape: faster per image at a size seen before, for data sets with very few image sizes (see
docs/extraction.md, "Extraction at scale").
"""

from __future__ import annotations

import mindspore
from mindspore import Tensor, nn

from model_utils.cli import InputError

INPUT_SHAPES = ("dynamic", "static")


def is_graph_mode() -> bool:
    return mindspore.get_context("mode") == mindspore.GRAPH_MODE


def set_input_shapes(model: nn.Cell, input_shapes: str = "dynamic") -> nn.Cell:
    """Make `model` (image (1, 3, H, W) -> maps) compile once for any H, W when input_shapes is
    'dynamic' and MindSpore runs in graph mode; 'static' (or PyNative) leaves it as it is."""
    if input_shapes not in INPUT_SHAPES:
        raise InputError(f"input shapes must be one of {', '.join(INPUT_SHAPES)}, got {input_shapes!r}")
    if input_shapes == "dynamic" and is_graph_mode():
        model.set_inputs(Tensor(shape=[1, 3, None, None], dtype=mindspore.float32))
    return model
