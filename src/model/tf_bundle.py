"""Read TensorFlow checkpoints (the TensorBundle format of `variables/variables.*`) in plain NumPy.

No TensorFlow and no protobuf compiler: the few messages involved are decoded from the wire format.

Layout of a bundle with prefix P:
- `P.index`: an SSTable (LevelDB table format). Its 48-byte footer holds the metaindex and index
  block handles and the magic number; the index block maps the last key of every data block to
  that block's handle; a block is prefix-compressed entries, then a uint32 restart array and its
  length, followed in the file by a 5-byte trailer (compression type: 0 raw, 1 Snappy; masked
  crc32c of block + type byte). Key "" holds a BundleHeaderProto, every other key (a variable
  name) a BundleEntryProto: dtype, shape, shard_id, offset, size, masked crc32c of the bytes.
- `P.data-SSSSS-of-NNNNN`: the tensors' raw little-endian bytes, at (offset, size) in shard S.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import cramjam
import google_crc32c
import numpy as np

from model_utils.cli import InputError
from src.model.protobuf_wire import (
    FIXED32,
    FIXED64,
    LENGTH_DELIMITED,
    VARINT,
    MalformedError,
    parse_fields,
    read_varint,
)

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
_CRC_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto DataType -> NumPy dtype, for the fixed-size types.
DTYPES: dict[int, tuple[str, np.dtype]] = {
    1: ("float32", np.dtype("<f4")), 2: ("float64", np.dtype("<f8")), 3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")), 5: ("int16", np.dtype("<i2")), 6: ("int8", np.dtype("i1")),
    8: ("complex64", np.dtype("<c8")), 9: ("int64", np.dtype("<i8")), 10: ("bool", np.dtype("?")),
    17: ("uint16", np.dtype("<u2")), 18: ("complex128", np.dtype("<c16")), 19: ("float16", np.dtype("<f2")),
    22: ("uint32", np.dtype("<u4")), 23: ("uint64", np.dtype("<u8")),
}
# Types that exist in checkpoints but have no fixed-size NumPy form here (listed, not read).
OTHER_DTYPE_NAMES = {7: "string", 14: "bfloat16", 20: "resource", 21: "variant"}


class BundleEntry(NamedTuple):
    """Where one tensor lives and what it is (a decoded BundleEntryProto)."""

    name: str
    dtype: int  # TF DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked crc32c of the tensor bytes, None when the writer left it out
    sliced: bool  # a partitioned variable: stored as slices under other keys (not supported)

    @property
    def dtype_name(self) -> str:
        if self.dtype in DTYPES:
            return DTYPES[self.dtype][0]
        return OTHER_DTYPE_NAMES.get(self.dtype, f"dtype#{self.dtype}")


# ---- checksums -------------------------------------------------------------------------------

def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, through the google-crc32c package (C, hardware-accelerated)."""
    return google_crc32c.value(bytes(data))


def mask_crc(crc: int) -> int:
    """LevelDB/TF crc masking: rotate right by 15 bits and add a constant (stored CRCs are masked)."""
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# ---- protobuf wire format (just what BundleEntryProto / BundleHeaderProto need) --------------

def decode_fields(message: bytes, wire_types: Mapping[int, int] | None = None) -> list[tuple[int, int | bytes]]:
    """(field number, value) of every field; varints and fixed32/64 as int, the rest as bytes.

    With `wire_types` (field number -> the wire type the schema gives it) only those fields are
    returned, and one of another wire type is a MalformedError: a damaged message then cannot hand
    an int where bytes are expected (or the reverse) to the caller."""
    fields = []
    for number, wire_type, value in parse_fields(message):
        if wire_types is not None:
            if number not in wire_types:
                continue
            if wire_type != wire_types[number]:
                raise MalformedError(f"field {number} has wire type {wire_type}, expected {wire_types[number]}")
        fields.append((number, int.from_bytes(value, "little") if wire_type in (FIXED32, FIXED64) else value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_shape(message: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); unknown_rank = 3."""
    dims = []
    for number, value in decode_fields(message, {2: LENGTH_DELIMITED, 3: VARINT}):
        if number == 2:
            size = next((v for n, v in decode_fields(value, {1: VARINT}) if n == 1), 0)
            dims.append(_signed64(size))
        elif number == 3 and value:
            raise MalformedError("tensor of unknown rank")
    return tuple(dims)


_ENTRY_WIRE_TYPES = {1: VARINT, 2: LENGTH_DELIMITED, 3: VARINT, 4: VARINT, 5: VARINT, 6: FIXED32,
                     7: LENGTH_DELIMITED}


def decode_entry(name: str, message: bytes) -> BundleEntry:
    """BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7."""
    values: dict[int, int | bytes] = {}
    sliced = False
    for number, value in decode_fields(message, _ENTRY_WIRE_TYPES):
        if number == 7:
            sliced = True
        else:
            values[number] = value
    return BundleEntry(name, int(values.get(1, 0)), _decode_shape(values.get(2, b"")), int(values.get(3, 0)),
                       _signed64(int(values.get(4, 0))), _signed64(int(values.get(5, 0))),
                       int(values[6]) if 6 in values else None, sliced)


# ---- the SSTable of the .index file ---------------------------------------------------------

def _block_handle(buffer: bytes, position: int = 0) -> tuple[int, int, int]:
    """(offset, size, next position) of an encoded BlockHandle (two varint64)."""
    offset, position = read_varint(buffer, position)
    size, position = read_varint(buffer, position)
    return offset, size, position


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    """The contents of one block: trailer checked, decompressed when Snappy."""
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER_SIZE > len(table):
        raise MalformedError(f"block at {offset} (+{size}) runs past the end of the file ({len(table)} bytes)")
    contents = table[offset:end]
    compression = table[end]
    (stored_crc,) = struct.unpack_from("<I", table, end + 1)
    if mask_crc(crc32c(table[offset:end + 1])) != stored_crc:
        raise MalformedError(f"block at offset {offset}: checksum mismatch (the file is corrupt)")
    if compression == NO_COMPRESSION:
        return contents
    if compression == SNAPPY_COMPRESSION:
        try:
            return bytes(cramjam.snappy.decompress_raw(contents))
        except cramjam.DecompressionError as error:
            raise MalformedError(f"block at offset {offset}: bad Snappy data ({error})") from None
    raise MalformedError(f"block at offset {offset}: unknown compression type {compression}")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a block, undoing the prefix compression (restart points need no use
    when every entry is read in order: each entry's shared prefix refers to the previous key)."""
    if len(block) < 4:
        raise MalformedError("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    data_end = len(block) - 4 - 4 * num_restarts
    if data_end < 0:
        raise MalformedError(f"block claims {num_restarts} restart points, more than it can hold")
    entries = []
    key = b""
    position = 0
    while position < data_end:
        shared, position = read_varint(block, position)
        unshared, position = read_varint(block, position)
        value_length, position = read_varint(block, position)
        if shared > len(key) or position + unshared + value_length > data_end:
            raise MalformedError(f"corrupt block entry at {position}")
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        entries.append((key, block[position:position + value_length]))
        position += value_length
    return entries


def read_table(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable file, in key order; InputError naming the file when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"TensorFlow checkpoint index not found: {path}")
    table = path.read_bytes()
    try:
        if len(table) < FOOTER_SIZE:
            raise MalformedError(f"{len(table)} bytes, shorter than a table footer")
        footer = table[-FOOTER_SIZE:]
        (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
        if magic != TABLE_MAGIC:
            raise MalformedError(f"bad magic number {magic:#x} (not a TensorFlow checkpoint index)")
        _, _, position = _block_handle(footer)  # the metaindex: no filters or stats are needed
        index_offset, index_size, _ = _block_handle(footer, position)
        entries = []
        for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
            offset, size, _ = _block_handle(handle)
            entries.extend(_block_entries(_read_block(table, offset, size)))
        return entries
    except MalformedError as error:
        raise InputError(f"{path}: {error}") from None


# ---- the bundle --------------------------------------------------------------------------------

def bundle_prefix(path: str | os.PathLike) -> Path:
    """The bundle prefix for a SavedModel dir, its variables/ dir, the prefix itself or its .index."""
    path = Path(path)
    if path.is_dir():
        if (path / "variables").is_dir():
            path = path / "variables"
        return path / "variables"
    if path.suffix == ".index":
        return path.with_suffix("")
    return path


class TensorBundle:
    """The tensors of a TF checkpoint: `entries` (name -> BundleEntry) and `read(name)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.prefix = bundle_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        self.num_shards = 1
        self.entries: dict[str, BundleEntry] = {}
        for key, value in read_table(self.index_path):
            try:
                if key == b"":
                    self._read_header(value)
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = decode_entry(name, value)
            except (MalformedError, UnicodeDecodeError) as error:
                raise InputError(f"{self.index_path}: bad entry {key[:80]!r}: {error}") from None

    def _read_header(self, message: bytes) -> None:
        """BundleHeaderProto: num_shards=1, endianness=2 (0 little, 1 big), version=3."""
        values = dict(decode_fields(message, {1: VARINT, 2: VARINT, 3: LENGTH_DELIMITED}))
        self.num_shards = int(values.get(1, 1))
        if values.get(2, 0) != 0:
            raise InputError(f"{self.index_path}: big-endian checkpoint, not supported")

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> np.ndarray:
        """One tensor as a NumPy array, its crc32c verified."""
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(f"{self.index_path}: no variable named {name!r}")
        if entry.sliced:
            raise InputError(f"{self.index_path}: {name} is a partitioned variable (stored in slices), not supported")
        if entry.dtype not in DTYPES:
            raise InputError(f"{self.index_path}: {name} has unsupported dtype {entry.dtype_name}")
        dtype = DTYPES[entry.dtype][1]
        if any(dim < 0 for dim in entry.shape) or math.prod(entry.shape) * dtype.itemsize != entry.size:
            raise InputError(f"{self.index_path}: {name}: {entry.size} bytes cannot hold a {entry.dtype_name} "
                             f"tensor of shape {list(entry.shape)}")
        shard = self.shard_path(entry.shard_id)
        if not shard.is_file():
            raise InputError(f"{shard}: data shard of {self.index_path} is missing (needed for {name})")
        with open(shard, "rb") as stream:
            shard_size = os.fstat(stream.fileno()).st_size
            # The index is checksummed, not the numbers in it: bound them before seeking.
            if not 0 <= entry.offset <= entry.offset + entry.size <= shard_size:
                raise InputError(f"{shard}: {name} is said to be at bytes {entry.offset}..{entry.offset + entry.size}, "
                                 f"outside the file's {shard_size} bytes: {self.index_path} does not belong to this "
                                 "data (a truncated shard or a mixed-up checkpoint): copy both again")
            stream.seek(entry.offset)
            data = stream.read(entry.size)
        if len(data) != entry.size:
            raise InputError(f"{shard}: {name}: read {len(data)} of {entry.size} bytes (the file shrank while read)")
        if entry.crc32c is not None and mask_crc(crc32c(data)) != entry.crc32c:
            raise InputError(f"{shard}: checksum (crc32c) mismatch for {name}: the file is corrupt")
        return np.frombuffer(data, dtype=dtype).reshape(entry.shape).copy()
