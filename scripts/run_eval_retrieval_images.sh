#!/usr/bin/env bash
# Oxford5k / Paris6k retrieval evaluation: features -> retrieval -> mAP.txt.
# Usage: bash scripts/run_eval_retrieval_images.sh IMAGES_PATH GT_PATH CHECKPOINT DEVICES [--key=value ...]
#   GT_PATH: the classic gt folder (gt_files_170407, paris_120310) or revisitop's gnd_*.pkl / .mat.
#   DEVICES: comma-separated device ids, one extraction worker each (CPU workers without accelerators).
#   Extra arguments go to eval.py (e.g. --retrieval.mode=exhaustive) or override delf_config.yaml.
# Writes OUTPUT_DIR (default ./eval_output): mAP.txt, metrics.json, ranks_*.npy, report.html, features/, logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ $# -lt 4 ]]; then
    echo "usage: bash scripts/run_eval_retrieval_images.sh IMAGES_PATH GT_PATH CHECKPOINT DEVICES [--key=value ...]" >&2
    exit 2
fi
IMAGES_PATH=$1 GT_PATH=$2 CHECKPOINT=$3 DEVICES=$4
shift 4
[[ -d "$IMAGES_PATH" ]] || { echo "error: image directory not found: $IMAGES_PATH" >&2; exit 2; }
[[ -e "$GT_PATH" ]] || { echo "error: ground truth not found: $GT_PATH" >&2; exit 2; }
[[ -f "$CHECKPOINT" ]] || { echo "error: checkpoint not found: $CHECKPOINT" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
"$PYTHON" "$ROOT/eval.py" --images_path "$IMAGES_PATH" --gt_path "$GT_PATH" --ckpt_path "$CHECKPOINT" \
    --devices "$DEVICES" --output_dir "${OUTPUT_DIR:-eval_output}" "$@"
