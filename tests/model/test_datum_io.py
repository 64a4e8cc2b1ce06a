"""The .datum decoder against files encoded byte by byte here, and its encoder by round trip."""

import numpy as np
import pytest

from model_utils.cli import InputError
from src.datum_io import main
from src.model.datum_io import read_datum, write_datum

# [[1.0, -2.0, 0.5], [3.0, 0.0, 0.25]] as little-endian float32 bytes.
FLOAT_BYTES = [
    [0x00, 0x00, 0x80, 0x3F],
    [0x00, 0x00, 0x00, 0xC0],
    [0x00, 0x00, 0x00, 0x3F],
    [0x00, 0x00, 0x40, 0x40],
    [0x00, 0x00, 0x00, 0x00],
    [0x00, 0x00, 0x80, 0x3E],
]
EXPECTED = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.25]], dtype=np.float32)

PACKED_2X3 = bytes(
    [0x0A, 0x04]  # field 1 (shape), length-delimited, 4 bytes
    + [0x0A, 0x02, 0x02, 0x03]  # DatumShape: field 1 packed, 2 bytes: dims 2, 3
    + [0x12, 0x1A]  # field 2 (float_list), 26 bytes
    + [0x0A, 0x18]  # FloatList: field 1 packed, 24 bytes
    + sum(FLOAT_BYTES, [])
)


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def test_reads_hand_encoded_packed_file(tmp_path):
    array = read_datum(write_bytes(tmp_path / "a.datum", PACKED_2X3))
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, EXPECTED)


def test_encoder_produces_the_same_bytes(tmp_path):
    write_datum(tmp_path / "b.datum", EXPECTED)
    assert (tmp_path / "b.datum").read_bytes() == PACKED_2X3


def test_reads_unpacked_fields_and_skips_unknown_ones(tmp_path):
    unpacked = bytes(
        [0x12, 6 * 5]  # float_list first: the wire format does not fix the order
        + sum(([0x0D, *value] for value in FLOAT_BYTES), [])  # field 1 as fixed32, one per value
        + [0x0A, 0x04, 0x08, 0x02, 0x08, 0x03]  # shape with dims as separate varints 2, 3
        + [0x20, 0x96, 0x01]  # unknown field 4 (varint 150): ignored
    )
    np.testing.assert_array_equal(read_datum(write_bytes(tmp_path / "u.datum", unpacked)), EXPECTED)


def test_multi_byte_dims_and_split_repeated_fields(tmp_path):
    # shape 300 x 1: 300 is the two-byte varint AC 02; the values come in two float_list fields.
    values = np.arange(300, dtype="<f4")
    first, second = values[:100].tobytes(), values[100:].tobytes()
    data = bytes(
        [0x0A, 0x05, 0x0A, 0x03, 0xAC, 0x02, 0x01]
        + [0x12, 0x93, 0x03, 0x0A, 0x90, 0x03]  # 403-byte message holding 400 bytes of floats
        + list(first)
        + [0x12, 0xA3, 0x06, 0x0A, 0xA0, 0x06]  # 803-byte message holding 800 bytes of floats
        + list(second)
    )
    array = read_datum(write_bytes(tmp_path / "m.datum", data))
    assert array.shape == (300, 1)
    np.testing.assert_array_equal(array[:, 0], values)


def test_uint32_list(tmp_path):
    data = bytes(
        [0x0A, 0x03, 0x0A, 0x01, 0x03]  # shape [3]
        + [0x1A, 0x0A, 0x0A, 0x08]  # uint32_list, packed 8 bytes
        + [0x00, 0xAC, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]  # 0, 300, 2^32 - 1
    )
    array = read_datum(write_bytes(tmp_path / "u32.datum", data))
    assert array.dtype == np.uint32
    np.testing.assert_array_equal(array, [0, 300, 2**32 - 1])
    write_datum(tmp_path / "again.datum", array)
    assert (tmp_path / "again.datum").read_bytes() == data


@pytest.mark.parametrize("shape", [(2, 3), (0,), (5, 0, 2), (), (4, 1024)])
def test_round_trip(tmp_path, shape):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    write_datum(tmp_path / "r.datum", array)
    result = read_datum(tmp_path / "r.datum")
    assert result.shape == shape and result.dtype == np.float32
    np.testing.assert_array_equal(result, array)


def test_truncated_and_malformed_files_name_the_file(tmp_path):
    write_datum(tmp_path / "full.datum", np.ones((10, 10), np.float32))
    full = (tmp_path / "full.datum").read_bytes()
    for cut in (1, 3, 9, len(full) - 1):
        path = write_bytes(tmp_path / f"cut{cut}.datum", full[:cut])
        with pytest.raises(InputError, match=rf"cut{cut}\.datum is not a valid DELF \.datum file"):
            read_datum(path)
    wrong_count = bytearray(PACKED_2X3)
    wrong_count[5] = 0x04  # shape 2 x 4 but six values
    with pytest.raises(InputError, match=r"shape \[2, 4\] needs 8 values, found 6"):
        read_datum(write_bytes(tmp_path / "count.datum", bytes(wrong_count)))
    with pytest.raises(InputError, match="wire type 3"):
        read_datum(write_bytes(tmp_path / "group.datum", bytes([0x0B])))
    with pytest.raises(InputError, match="no shape"):
        read_datum(write_bytes(tmp_path / "empty.datum", b""))


def test_cli_converts_to_npy(tmp_path, capsys):
    source = write_bytes(tmp_path / "mean.datum", PACKED_2X3)
    assert main([str(source), str(tmp_path / "mean.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "mean.npy", allow_pickle=False), EXPECTED)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    broken = write_bytes(tmp_path / "broken.datum", PACKED_2X3[:-2])
    with pytest.raises(SystemExit) as exit_info:
        main([str(broken), str(tmp_path / "broken.npy")])
    assert exit_info.value.code == 2
    assert "broken.datum is not a valid DELF .datum file" in capsys.readouterr().err
    assert not (tmp_path / "broken.npy").exists()
