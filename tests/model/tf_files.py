"""Writers of the TF file formats the importer reads (protobuf messages, the SSTable of a checkpoint
index), so tests can build well-formed and deliberately damaged files without TensorFlow."""

from __future__ import annotations

import struct
from pathlib import Path

from src.model import tf_bundle


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes, wire_type: int | None = None) -> bytes:
    """One protobuf field: an int as a varint, bytes as length-delimited, unless `wire_type` says
    otherwise (5: the int as fixed32) - a wrong type is how tests make damaged messages."""
    if wire_type is None:
        wire_type = 2 if isinstance(value, bytes) else 0
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + varint(value)
    if wire_type == 5:
        return key + struct.pack("<I", value)
    return key + varint(len(value)) + value


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A table block without prefix sharing (valid: sharing is the writer's choice), one restart point."""
    body = b"".join(varint(0) + varint(len(key)) + varint(len(value)) + key + value for key, value in entries)
    return body + struct.pack("<II", 0, 1)


def write_table(path: Path, entries: list[tuple[bytes, bytes]], compression: int) -> None:
    """An SSTable as TF's reader expects it: data block, metaindex, index, footer; blocks compressed
    with Snappy when compression is 1."""
    import cramjam

    out = bytearray()

    def add_block(contents: bytes) -> bytes:
        if compression == tf_bundle.SNAPPY_COMPRESSION:
            contents = bytes(cramjam.snappy.compress_raw(contents))
        handle = varint(len(out)) + varint(len(contents))
        trailer = bytes([compression])
        out.extend(contents + trailer + struct.pack("<I", tf_bundle.mask_crc(tf_bundle.crc32c(contents + trailer))))
        return handle

    data_handle = add_block(_block(entries))
    metaindex_handle = add_block(_block([]))
    index_handle = add_block(_block([(entries[-1][0], data_handle)]))
    footer = (metaindex_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", tf_bundle.TABLE_MAGIC)
    path.write_bytes(bytes(out) + footer)
