#!/usr/bin/env bash
# Extract DELF features of the two images named in list_images.txt and match them.
# Usage: bash scripts/run_eval_match_images.sh IMAGES_PATH CHECKPOINT [DEVICES] [--key=value ...]
#   DEVICES: device ids, e.g. "0" (the first one is used; two images need no more).
#   Extra --key=value arguments override delf_config.yaml (e.g. --extraction.use_pca=false).
#   Two images run in PyNative mode (graph mode would compile once per pyramid shape).
# Writes eval_match.png, extract_feature.log and match_images.log in OUTPUT_DIR (default: .).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/run_eval_match_images.sh IMAGES_PATH CHECKPOINT [DEVICES] [--key=value ...]" >&2
    exit 2
fi
IMAGES_PATH=$1
CHECKPOINT=$2
DEVICES=${3:-0}
shift $(($# < 3 ? $# : 3))
OUTPUT_DIR=${OUTPUT_DIR:-.}
LIST=${LIST_IMAGES:-$ROOT/list_images.txt}
[[ -d "$IMAGES_PATH" ]] || { echo "error: image directory not found: $IMAGES_PATH" >&2; exit 2; }
[[ -f "$CHECKPOINT" ]] || { echo "error: checkpoint not found: $CHECKPOINT" >&2; exit 2; }
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
DEVICE_ID=${DEVICES%%,*}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}

echo "== extracting features (log: $OUTPUT_DIR/extract_feature.log)"
"$PYTHON" -m src.extract_feature --images_path "$IMAGES_PATH" --list_images_path "$LIST" \
    --ckpt_path "$CHECKPOINT" --output_path "$OUTPUT_DIR/match_features.h5" \
    --log_path "$OUTPUT_DIR/extract_feature.log" --device_id="$DEVICE_ID" --mode=pynative "$@"
echo "== matching (log: $OUTPUT_DIR/match_images.log)"
"$PYTHON" -m src.match_images --images_path "$IMAGES_PATH" --list_images_path "$LIST" \
    --features_path "$OUTPUT_DIR/match_features.h5" --output_image "$OUTPUT_DIR/eval_match.png" \
    2>&1 | tee "$OUTPUT_DIR/match_images.log"
exit "${PIPESTATUS[0]}"
