"""Plot training curves (loss, accuracy, learning rate against the step) of one or several train.py logs.

    python -m src.plot_training ckpt/train_tuning.log [ckpt/train_attn.log ...] [--output curves.png]

Every log becomes one line per panel (one per training stage when a log holds several); a resumed
run, appended to its log, continues its curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/plot_training.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import require_writable  # noqa: E402
from src.training.curves import write_training_curves  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", metavar="LOG", help="train.py log file(s) (train_<stage>.log)")
    parser.add_argument("--output", default="training_curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    require_writable(args.output, "output image")
    print(f"wrote {write_training_curves(args.logs, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
