"""Run an exported DELF MindIR over the input files of src.preprocess (src/ascend310/runner.py): what
ascend310_infer/ does on Ascend 310, on any device.

    python -m src.infer_mindir --mindir_path DELF_MindIR.mindir --input_path WORK/inputs \
        --output_path WORK/outputs

Each input file is consumed; the exit status is 1 when some failed (they are listed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/infer_mindir.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main, setup_logging  # noqa: E402
from model_utils.device import setup_device  # noqa: E402
from model_utils.files import require_writable_dir  # noqa: E402
from src.ascend310.runner import run_inference  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mindir_path", required=True,
                        help="DELF_MindIR.mindir (static <prefix>_<H>x<W>.mindir beside it are used when present)")
    parser.add_argument("--input_path", required=True, help="the preprocess inputs/ directory (files are consumed)")
    parser.add_argument("--output_path", required=True, help="directory for the network outputs")
    parser.add_argument("--device_target", default="auto", help="auto, Ascend, GPU or CPU")
    parser.add_argument("--device_id", type=int, default=0, help="device index")
    args = parser.parse_args(argv)
    require_writable_dir(args.output_path, "output folder")
    setup_logging()
    setup_device(args.device_target, args.device_id, graph_mode=False)
    failed = run_inference(args.mindir_path, args.input_path, args.output_path)
    print(f"{len(failed)} level files failed" if failed else f"outputs -> {args.output_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
