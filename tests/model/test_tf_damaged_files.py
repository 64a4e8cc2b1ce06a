"""TF import on damaged files built here (no TensorFlow needed): a checkpoint index whose entries
are CRC-valid but point outside the data shard, and a saved_model.pb whose fields have the wrong
wire type. Each is one InputError naming the file (or, for the graph, a warning), never a traceback
from deep inside the reader (issue 20, items 13 and 14)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from tf_files import field, write_table

from model_utils.cli import InputError
from src.model import tf_bundle
from src.model.network import SLIM_BN_EPSILON
from src.model.tf_delf import graph_bn_epsilons, release_bn_epsilon

NAME = "resnet_v1_50/conv1/biases"
VALUES = np.arange(4, dtype="<f4")


def entry(offset: int, size: int, shape: tuple[int, ...] = (4,), dtype: int = 1) -> bytes:
    """A BundleEntryProto; offset and size as int64 (negative ones in two's complement)."""
    dims = b"".join(field(2, field(1, dim % 2**64)) for dim in shape)
    crc = tf_bundle.mask_crc(tf_bundle.crc32c(VALUES.tobytes()))
    return (field(1, dtype) + field(2, dims) + field(3, 0) + field(4, offset % 2**64) + field(5, size % 2**64)
            + field(6, crc, wire_type=5))


def bundle(directory: Path, value: bytes, header: bytes = field(1, 1)) -> Path:
    """variables.index with one tensor entry, beside a data shard holding 8 bytes then the tensor."""
    prefix = directory / "variables"
    directory.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"\0" * 8 + VALUES.tobytes())
    write_table(Path(f"{prefix}.index"), [(b"", header), (NAME.encode(), value)], tf_bundle.NO_COMPRESSION)
    return prefix


def test_a_well_formed_bundle_reads_back(tmp_path):
    np.testing.assert_array_equal(tf_bundle.TensorBundle(bundle(tmp_path, entry(8, 16))).read(NAME), VALUES)


@pytest.mark.parametrize(("offset", "size"), [(-8, 16), (2**62, 16), (8, 2**40), (16, 16), (2**63 - 8, 16)],
                         ids=["negative", "huge", "huge-size", "past-the-end", "overflowing-end"])
def test_entries_pointing_outside_the_shard_are_one_line(tmp_path, offset, size):
    shape = (size // 4,)
    prefix = bundle(tmp_path, entry(offset, size, shape))
    with pytest.raises(InputError, match=r"variables\.data-00000-of-00001: resnet_v1_50/conv1/biases is said to "
                                         r"be at bytes .* outside the file's 24 bytes") as raised:
        tf_bundle.TensorBundle(prefix).read(NAME)
    assert "\n" not in str(raised.value)


def test_negative_dimensions_are_refused(tmp_path):
    prefix = bundle(tmp_path, entry(8, 16, shape=(-2, -2)))
    with pytest.raises(InputError, match=r"variables\.index: resnet_v1_50/conv1/biases: 16 bytes cannot hold"):
        tf_bundle.TensorBundle(prefix).read(NAME)


@pytest.mark.parametrize("value", [
    field(2, 7),  # shape as a varint
    field(1, b"\x01"),  # dtype as bytes
    field(6, b"abcd"),  # crc32c as bytes
    field(2, field(2, 5)),  # a shape dimension as a varint
], ids=["shape", "dtype", "crc32c", "dimension"])
def test_entry_fields_of_the_wrong_wire_type_are_one_line(tmp_path, value):
    with pytest.raises(InputError, match=r"variables\.index: bad entry .*wire type") as raised:
        tf_bundle.TensorBundle(bundle(tmp_path, value))
    assert "\n" not in str(raised.value)


def test_a_header_field_of_the_wrong_wire_type_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"variables\.index: bad entry b'': field 1 has wire type 2"):
        tf_bundle.TensorBundle(bundle(tmp_path, entry(8, 16), header=field(1, b"\x01")))


# ---- saved_model.pb ------------------------------------------------------------------------------

def batch_norm_node(epsilon_attr: bytes, op: bytes | int = b"FusedBatchNormV3") -> bytes:
    return field(1, b"bn") + field(2, op) + field(5, field(1, b"epsilon") + field(2, epsilon_attr))


def saved_model(node: bytes) -> bytes:
    """SavedModel.meta_graphs(2).graph_def(2).node(1) = node."""
    return field(1, 1) + field(2, field(2, field(1, node)))


EPSILON_1E5 = field(4, int(np.array(1e-5, "<f4").view("<u4")), wire_type=5)


def test_the_epsilon_is_read_from_a_well_formed_graph(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(saved_model(batch_norm_node(EPSILON_1E5)))
    assert graph_bn_epsilons(tmp_path / "saved_model.pb") == {float(np.float32(1e-5))}
    assert release_bn_epsilon(tmp_path) == (float(np.float32(1e-5)), "saved_model.pb")


@pytest.mark.parametrize("graph", [
    field(2, 5),  # meta_graphs as a varint
    field(2, field(2, 5)),  # graph_def as a varint
    field(2, field(2, field(1, 9))),  # a node as a varint
    saved_model(batch_norm_node(EPSILON_1E5, op=3)),  # the op name as a varint
    saved_model(field(2, b"FusedBatchNorm") + field(5, 4)),  # an attr entry as a varint
    saved_model(batch_norm_node(field(4, b"\x00\x00\x80\x3f"))),  # the float as bytes
    saved_model(batch_norm_node(field(4, 7))),  # the float as a varint
], ids=["meta_graph", "graph_def", "node", "op", "attr", "float-bytes", "float-varint"])
def test_a_graph_field_of_the_wrong_wire_type_is_a_warning(tmp_path, caplog, graph):
    (tmp_path / "saved_model.pb").write_bytes(graph)
    with caplog.at_level(logging.WARNING, logger="delf.tf_import"):
        assert release_bn_epsilon(tmp_path) == (SLIM_BN_EPSILON, "tf-slim resnet_arg_scope default")
    assert "saved_model.pb: cannot read BatchNorm epsilon" in caplog.text and "wire type" in caplog.text
