#!/usr/bin/env bash
# The Ascend-310 inference path on two images: exported MindIR -> src.infer_310 (preprocess -> runner ->
# postprocess, chunk by chunk) -> src.match_images.
# Usage: bash scripts/run_infer_310_match_images.sh MINDIR IMAGES_PATH DEVICE_ID [--key=value ...]
#   MINDIR       DELF_MindIR.mindir from export.py (static DELF_MindIR_<H>x<W>.mindir beside it are used
#                for the canvas shapes they fit)
#   --key=value  overrides of delf_config.yaml for src.infer_310 (e.g. --extraction.use_pca=false)
# Environment:
#   RUNNER       auto (default: the C++ runner when MindSpore sees an Ascend device, else Python), cpp, python
#   INPUT_MODE   exact (dynamic MindIR, default for python) or canvas (static shapes, default for cpp;
#                needs --extraction.max_image_size=...)
#   OUTPUT_DIR   where test_match.png, the features and the logs go (default .)
#   LIST_IMAGES  the file naming the two images (default list_images.txt)
#   CHUNK_SIZE   images on disk at a time (default 16; MAX_PENDING is its old name). The C++ runner
#                starts (and builds its models) once per chunk: on Ascend a larger chunk saves time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ $# -lt 3 ]]; then
    echo "usage: bash scripts/run_infer_310_match_images.sh MINDIR IMAGES_PATH DEVICE_ID [--key=value ...]" >&2
    exit 2
fi
MINDIR=$1
IMAGES_PATH=$2
DEVICE_ID=$3
shift 3
OUTPUT_DIR=${OUTPUT_DIR:-.}
LIST=${LIST_IMAGES:-$ROOT/list_images.txt}
[[ -d "$IMAGES_PATH" ]] || { echo "error: image directory not found: $IMAGES_PATH" >&2; exit 2; }
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}

# shellcheck source=infer_310_common.sh
source "$ROOT/scripts/infer_310_common.sh"
run_310_pipeline --list_images_path "$LIST" -- "$@"

echo "== matching (log: $OUTPUT_DIR/match_images.log)"
"$PYTHON" -m src.match_images --images_path "$IMAGES_PATH" --list_images_path "$LIST" \
    --features_path "$FEATURES/features.h5" --output_image "$OUTPUT_DIR/test_match.png" \
    2>&1 | tee "$OUTPUT_DIR/match_images.log"
exit "${PIPESTATUS[0]}"
