"""What the graph of a TF SavedModel (saved_model.pb) says about the network, read from the wire
format without TensorFlow: the nodes' names, ops and attributes, from which the importers take the
BatchNorm epsilons (not stored with the weights) and the pyramid's resize mode.

Messages: SavedModel.meta_graphs = 2 (MetaGraphDef); MetaGraphDef.graph_def = 2 (GraphDef);
GraphDef.node = 1 and GraphDef.library = 2 (FunctionDefLibrary.function = 1, FunctionDef.node_def
= 3: the nodes of TF2 functions); NodeDef: name = 1, op = 2, attr = 5 (map entries: key 1, value 2);
AttrValue: f = 4 (float), b = 5 (bool). A field of the wrong wire type is a MalformedError.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from src.model.protobuf_wire import FIXED32, LENGTH_DELIMITED, VARINT, MalformedError, parse_fields


class GraphNode(NamedTuple):
    name: str
    op: str
    attrs: dict[str, bytes]  # attribute name -> encoded AttrValue


def _messages(buffer: bytes, number: int, what: str) -> Iterator[bytes]:
    """The values of the length-delimited field `number` of a message."""
    for field, wire_type, value in parse_fields(buffer):
        if field == number:
            if wire_type != LENGTH_DELIMITED:
                raise MalformedError(f"{what} (field {number}) has wire type {wire_type}, not a message")
            yield value


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError(f"{what} is not UTF-8 text") from None


def _node(message: bytes) -> GraphNode:
    name = next((_text(value, "node name") for value in _messages(message, 1, "NodeDef.name")), "")
    op = next((_text(value, f"op of {name}") for value in _messages(message, 2, "NodeDef.op")), "")
    attrs = {}
    for entry in _messages(message, 5, "NodeDef.attr"):
        key = next((_text(value, f"attribute of {name}") for value in _messages(entry, 1, "attr key")), "")
        attrs[key] = next(_messages(entry, 2, f"attr {key} of {name}"), b"")
    return GraphNode(name, op, attrs)


def graph_nodes(saved_model_path: str | os.PathLike) -> list[GraphNode]:
    """Every node of the graph and of its functions; MalformedError for a damaged file."""
    data = Path(saved_model_path).read_bytes()
    nodes = []
    for meta_graph in _messages(data, 2, "SavedModel.meta_graphs"):
        for graph_def in _messages(meta_graph, 2, "MetaGraphDef.graph_def"):
            nodes.extend(_node(node) for node in _messages(graph_def, 1, "GraphDef.node"))
            for library in _messages(graph_def, 2, "GraphDef.library"):
                for function in _messages(library, 1, "FunctionDefLibrary.function"):
                    nodes.extend(_node(node) for node in _messages(function, 3, "FunctionDef.node_def"))
    return nodes


def _attr(value: bytes, number: int, wire_type: int) -> int | None:
    for field, kind, item in parse_fields(value):
        if field == number:
            if kind != wire_type:
                raise MalformedError(f"AttrValue field {number} has wire type {kind}, expected {wire_type}")
            return int.from_bytes(item, "little") if isinstance(item, bytes) else item
    return None


def attr_float(value: bytes) -> float | None:
    """AttrValue.f, or None when the attribute holds no float."""
    bits = _attr(value, 4, FIXED32)
    return None if bits is None else float(np.float32(struct.unpack("<f", struct.pack("<I", bits))[0]))


def attr_bool(value: bytes) -> bool | None:
    """AttrValue.b, or None when the attribute holds no bool (a false bool may be left out)."""
    flag = _attr(value, 5, VARINT)
    return None if flag is None else bool(flag)


def batch_norm_epsilons(nodes: list[GraphNode]) -> dict[str, float]:
    """Node name -> `epsilon` of every FusedBatchNorm node (non-fused BatchNorm states none)."""
    epsilons = {}
    for node in nodes:
        if node.op.startswith("FusedBatchNorm") and "epsilon" in node.attrs:
            epsilon = attr_float(node.attrs["epsilon"])
            if epsilon is not None:
                epsilons[node.name] = epsilon
    return epsilons


def resize_modes(nodes: list[GraphNode]) -> set[str]:
    """How the graph's ResizeBilinear nodes sample: "legacy" (TF1 resize_bilinear), "half_pixel_centers"
    (TF2 tf.image.resize) or "align_corners"; empty when the graph resizes nothing."""
    modes = set()
    for node in nodes:
        if node.op == "ResizeBilinear":
            flags = [flag for flag in ("half_pixel_centers", "align_corners")
                     if flag in node.attrs and attr_bool(node.attrs[flag])]
            modes.update(flags or ["legacy"])
    return modes
