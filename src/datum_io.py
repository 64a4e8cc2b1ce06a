"""Convert a TF DELF .datum file (e.g. the released PCA mean / projection) to .npy (src/model/datum_io.py).

    python -m src.datum_io INPUT.datum OUTPUT.npy
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/datum_io.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import atomic_write_bytes, require_writable  # noqa: E402
from src.model.datum_io import read_datum  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a TF DELF .datum file (e.g. the released PCA mean / projection) to .npy."
    )
    parser.add_argument("input", help="the .datum file to read")
    parser.add_argument("output", help="the .npy file to write")
    args = parser.parse_args(argv)
    output = require_writable(args.output, "output .npy")
    array = read_datum(args.input)
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(output, buffer.getvalue())
    print(f"wrote {output}: {array.dtype} array of shape {array.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
