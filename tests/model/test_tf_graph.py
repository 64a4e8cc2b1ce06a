"""src/model/tf_graph.py on saved_model.pb files written here field by field: the nodes, the BatchNorm
epsilons grouped by the DELG importer, the resize mode, and damaged files as one MalformedError."""

import logging

import numpy as np
import pytest
from tf_files import field

from model_utils.cli import InputError
from src.model import tf_delg
from src.model.protobuf_wire import MalformedError
from src.model.tf_graph import batch_norm_epsilons, graph_nodes, resize_modes


def attr(key: str, value: bytes) -> bytes:
    return field(5, field(1, key.encode()) + field(2, value))


def float_attr(value: float) -> bytes:
    return field(4, int(np.array(value, "<f4").view("<u4")), wire_type=5)  # AttrValue.f, fixed32


def bool_attr(value: bool) -> bytes:
    return field(5, int(value))  # AttrValue.b, varint


def node(name: str, op: str, *attrs: bytes) -> bytes:
    return field(1, field(1, name.encode()) + field(2, op.encode()) + b"".join(attrs))


def saved_model(*nodes: bytes) -> bytes:
    """SavedModel{schema_version: 1, meta_graphs: [MetaGraphDef{graph_def: GraphDef{node...}}]}."""
    return field(1, 1) + field(2, field(2, b"".join(nodes)))


BACKBONE_BN = "resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/BatchNorm/FusedBatchNormV3"


def test_nodes_epsilons_and_resize_modes(tmp_path):
    path = tmp_path / "saved_model.pb"
    path.write_bytes(saved_model(
        node(BACKBONE_BN, "FusedBatchNormV3", attr("epsilon", float_attr(1e-5))),
        node("while/attention_1/bn_conv1/FusedBatchNormV3", "FusedBatchNormV3", attr("epsilon", float_attr(1e-3))),
        node("resize/ResizeBilinear", "ResizeBilinear", attr("half_pixel_centers", bool_attr(False))),
        node("input_image", "Placeholder")))
    nodes = graph_nodes(path)
    assert [n.op for n in nodes] == ["FusedBatchNormV3", "FusedBatchNormV3", "ResizeBilinear", "Placeholder"]
    assert batch_norm_epsilons(nodes) == {BACKBONE_BN: float(np.float32(1e-5)),
                                          "while/attention_1/bn_conv1/FusedBatchNormV3": float(np.float32(1e-3))}
    assert resize_modes(nodes) == {"legacy"}
    facts = tf_delg.graph_facts(tmp_path, 50)  # each epsilon goes to its part, found under the layer's scope
    assert (facts.bn_epsilon, facts.attention_bn_epsilon, facts.source) == (
        float(np.float32(1e-5)), float(np.float32(1e-3)), "saved_model.pb")

    half_pixel = attr("half_pixel_centers", bool_attr(True))  # TF2's tf.image.resize
    path.write_bytes(saved_model(node("r/ResizeBilinear", "ResizeBilinear", half_pixel)))
    assert resize_modes(graph_nodes(path)) == {"half_pixel_centers"}


def test_two_epsilons_in_one_part_are_refused(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(saved_model(
        node(BACKBONE_BN, "FusedBatchNormV3", attr("epsilon", float_attr(1e-5))),
        node("resnet_v1_50/conv1/BatchNorm/FusedBatchNormV3", "FusedBatchNormV3", attr("epsilon", float_attr(1e-3)))))
    with pytest.raises(InputError, match=r"the backbone's BatchNorm layers use different epsilons"):
        tf_delg.graph_facts(tmp_path, 50)


@pytest.mark.parametrize("damage", ["name as varint", "epsilon as varint", "truncated"])
def test_damaged_graph_is_one_error_and_the_import_falls_back(tmp_path, caplog, damage):
    good = node(BACKBONE_BN, "FusedBatchNormV3", attr("epsilon", float_attr(1e-5)))
    if damage == "name as varint":
        data = saved_model(field(1, field(1, 7) + field(2, b"FusedBatchNormV3")))
    elif damage == "epsilon as varint":
        data = saved_model(node(BACKBONE_BN, "FusedBatchNormV3", attr("epsilon", field(4, 1))))
    else:
        data = saved_model(good)[:-5]
    path = tmp_path / "saved_model.pb"
    path.write_bytes(data)
    with pytest.raises(MalformedError):
        batch_norm_epsilons(graph_nodes(path))
    with caplog.at_level(logging.WARNING, logger="delf.tf_import"):
        facts = tf_delg.graph_facts(tmp_path, 50)
    assert facts.source.startswith("defaults") and "cannot read the graph" in caplog.text
