"""CLI of src/ascend310/runner.py (see there)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/infer_mindir.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.ascend310.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
