#!/usr/bin/env bash
# The demo: installs the requirements if needed, then DELF-matches a photo bundled with
# scikit-image against a synthetic new view of it and writes eval_match.png here.
# Usage: bash scripts/run_demo.sh [CHECKPOINT]   (default: untrained weights, said plainly)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import mindspore, skimage, cv2, h5py, tqdm" >/dev/null 2>&1; then
    echo "== installing requirements (first run only)"
    bash "$ROOT/scripts/install.sh"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
"$PYTHON" -m src.demo ${1:+--ckpt_path "$1"}
