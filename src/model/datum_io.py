"""Read and write TF DELF `.datum` files (a serialised DatumProto) without protobuf.

The message layout (proto2, delf/protos/datum.proto):

    DatumProto { DatumShape shape = 1;  oneof { FloatList float_list = 2; Uint32List uint32_list = 3; } }
    DatumShape { repeated int64 dim = 1; }      FloatList { repeated float value = 1; }
    Uint32List { repeated uint32 value = 1; }

Values are row-major. Repeated scalars are normally packed (one length-delimited field) but the
wire format also allows one field per value ("unpacked"); both are read. Unknown fields are
skipped, and a repeated field split over several occurrences is concatenated, as protobuf does.

CLI: python -m src.datum_io INPUT.datum OUTPUT.npy (src/datum_io.py)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model_utils.cli import InputError
from model_utils.files import atomic_write_bytes
from src.model.protobuf_wire import (
    FIXED32,
    LENGTH_DELIMITED,
    VARINT,
    MalformedError,
    parse_fields,
)


def _decode_packed_varints(payload: bytes) -> np.ndarray:
    """All varints of a packed field at once, as uint64 (vectorised: values can be many)."""
    data = np.frombuffer(payload, dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size == 0 or ends[-1] != data.size - 1:
        raise MalformedError("truncated packed varint")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise MalformedError("varint longer than 10 bytes")
    shifts = 7 * (np.arange(data.size) - np.repeat(starts, lengths))
    # The 7-bit groups never overlap, so summing the shifted groups is the same as OR-ing them.
    groups = (data & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
    return np.add.reduceat(groups, starts)


def _repeated_scalars(message: bytes, kind: str) -> np.ndarray:
    """Field 1 of a list message, packed or not: kind 'float' (fixed32) or 'varint'."""
    parts = []
    for number, wire_type, value in parse_fields(message):
        if number != 1:
            continue
        if wire_type == LENGTH_DELIMITED:
            if kind == "float":
                if len(value) % 4:
                    raise MalformedError(f"packed float list of {len(value)} bytes is not a multiple of 4")
                parts.append(np.frombuffer(value, dtype="<f4"))
            else:
                parts.append(_decode_packed_varints(value))
        elif kind == "float" and wire_type == FIXED32:
            parts.append(np.frombuffer(value, dtype="<f4"))
        elif kind == "varint" and wire_type == VARINT:
            parts.append(np.array([value], dtype=np.uint64))
        else:
            raise MalformedError(f"unexpected wire type {wire_type} for a repeated {kind} value")
    dtype = np.float32 if kind == "float" else np.uint64
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def decode_datum(data: bytes) -> np.ndarray:
    """Decode a serialised DatumProto: float32 array (float_list) or uint32 array (uint32_list)."""
    shape_messages, float_messages, uint32_messages = [], [], []
    for number, wire_type, value in parse_fields(data):
        targets = {1: shape_messages, 2: float_messages, 3: uint32_messages}
        if number in targets:
            if wire_type != LENGTH_DELIMITED:
                raise MalformedError(f"field {number} should be a message, has wire type {wire_type}")
            targets[number].append(value)
    if not shape_messages:
        raise MalformedError("no shape field")
    # Several occurrences of a message field merge, so their repeated contents concatenate.
    dims = _repeated_scalars(b"".join(shape_messages), "varint")
    if np.any(dims >= 2**63):
        raise MalformedError(f"negative dimension in shape {dims.astype(np.int64).tolist()}")
    shape = tuple(int(d) for d in dims)
    if float_messages and uint32_messages:
        raise MalformedError("both float_list and uint32_list are set")
    if uint32_messages:
        values = _repeated_scalars(b"".join(uint32_messages), "varint")
        if np.any(values >= 2**32):
            raise MalformedError("uint32_list holds a value above 2^32 - 1")
        values = values.astype(np.uint32)
    elif float_messages:
        values = _repeated_scalars(b"".join(float_messages), "float")
    else:
        values = np.zeros(0, dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise MalformedError(f"shape {list(shape)} needs {int(np.prod(shape))} values, found {values.size}")
    return values.reshape(shape)


def read_datum(path: str | os.PathLike) -> np.ndarray:
    """Read a .datum file: a float32 array (or uint32 for a uint32_list datum), shaped."""
    data = Path(path).read_bytes()
    try:
        return decode_datum(data)
    except MalformedError as error:
        raise InputError(f"{path} is not a valid DELF .datum file: {error}") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _packed_varints(values: np.ndarray) -> bytes:
    """Vectorised varint encoding of non-negative integers (uint32 lists can be large)."""
    values = values.astype(np.uint64).ravel()
    groups = (values[:, None] >> (7 * np.arange(10, dtype=np.uint64))) & np.uint64(0x7F)
    # A value needs as many bytes as its highest non-zero 7-bit group (zero still takes one byte).
    counts = 10 - np.argmax(groups[:, ::-1] != 0, axis=1)
    counts[~groups.any(axis=1)] = 1
    used = np.arange(10) < counts[:, None]
    continued = np.arange(10) < (counts[:, None] - 1)
    encoded = (groups | (continued * np.uint64(0x80))).astype(np.uint8)
    return encoded[used].tobytes()


def encode_datum(array: np.ndarray) -> bytes:
    """Serialise an array as a packed DatumProto (uint32 arrays as uint32_list, floats as float_list)."""
    array = np.asarray(array)
    if array.dtype == np.uint32:
        values = _length_delimited(1, _packed_varints(array))
        kind_field = 3
    elif np.issubdtype(array.dtype, np.floating):
        values = _length_delimited(1, array.astype("<f4").tobytes())
        kind_field = 2
    else:
        raise InputError(f"a .datum holds float32 or uint32 values, not {array.dtype}")
    shape = _length_delimited(1, _packed_varints(np.array(array.shape, dtype=np.uint64)))
    return _length_delimited(1, shape) + _length_delimited(kind_field, values)


def write_datum(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as a .datum file (packed encoding), atomically."""
    atomic_write_bytes(path, encode_datum(array))
