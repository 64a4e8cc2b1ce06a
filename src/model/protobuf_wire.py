"""The protobuf wire format, decoded by hand for the two TF files the suite reads without protobuf:
`.datum` arrays (datum_io.py) and checkpoint index entries (tf_bundle.py)."""

from __future__ import annotations

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class MalformedError(ValueError):
    """Raised while decoding; the readers turn it into an InputError naming the file."""


def read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise MalformedError("truncated varint")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 2**64:
                raise MalformedError("varint does not fit in 64 bits")
            return value, position
        shift += 7
        if shift >= 70:
            raise MalformedError("varint longer than 10 bytes")


def parse_fields(buffer: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of one message, in order."""
    fields: list[tuple[int, int, int | bytes]] = []
    position = 0
    while position < len(buffer):
        key, position = read_varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedError("field number 0")
        if wire_type == VARINT:
            value, position = read_varint(buffer, position)
        elif wire_type in (FIXED64, FIXED32, LENGTH_DELIMITED):
            if wire_type == LENGTH_DELIMITED:
                size, position = read_varint(buffer, position)
            else:
                size = 8 if wire_type == FIXED64 else 4
            if position + size > len(buffer):
                left = len(buffer) - position
                raise MalformedError(f"field {number} needs {size} bytes, only {left} left")
            value = bytes(buffer[position : position + size])
            position += size
        else:
            raise MalformedError(f"unsupported wire type {wire_type} (field {number})")
        fields.append((number, wire_type, value))
    return fields
