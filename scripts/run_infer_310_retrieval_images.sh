#!/usr/bin/env bash
# The Ascend-310 inference path on a retrieval data set: exported MindIR -> src.infer_310 (database
# images, and queries cropped to their bbx; preprocess -> runner -> postprocess) -> src.perform_retrieval,
# which ranks, evaluates (src.dataset, as eval) and writes mAP.txt.
# Usage: bash scripts/run_infer_310_retrieval_images.sh MINDIR IMAGES_PATH GT_PATH DEVICE_ID [--key=value ...]
#   MINDIR       DELF_MindIR.mindir from export.py (static DELF_MindIR_<H>x<W>.mindir beside it are used
#                for the canvas shapes they fit)
#   GT_PATH      Oxford/Paris gt txt directory, or a revisitop gnd_*.pkl / gnd_*.mat
#   --key=value  overrides of delf_config.yaml for src.infer_310 (e.g. --extraction.use_pca=false)
# Environment:
#   RUNNER       auto (default: the C++ runner when MindSpore sees an Ascend device, else Python), cpp, python
#   INPUT_MODE   exact (dynamic MindIR, default for python) or canvas (static shapes, default for cpp;
#                needs --extraction.max_image_size=...)
#   OUTPUT_DIR   where mAP.txt, metrics.json, ranks_*.npy, report.html, the features and the logs go (default .)
#   CHUNK_SIZE   images on disk at a time (default 16; MAX_PENDING is its old name). The C++ runner
#                starts (and builds its models) once per chunk: on Ascend a larger chunk saves time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ $# -lt 4 ]]; then
    echo "usage: bash scripts/run_infer_310_retrieval_images.sh MINDIR IMAGES_PATH GT_PATH DEVICE_ID [--key=value ...]" >&2
    exit 2
fi
MINDIR=$1
IMAGES_PATH=$2
GT_PATH=$3
DEVICE_ID=$4
shift 4
OUTPUT_DIR=${OUTPUT_DIR:-.}
[[ -d "$IMAGES_PATH" ]] || { echo "error: image directory not found: $IMAGES_PATH" >&2; exit 2; }
[[ -e "$GT_PATH" ]] || { echo "error: ground truth not found: $GT_PATH" >&2; exit 2; }
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}

# shellcheck source=infer_310_common.sh
source "$ROOT/scripts/infer_310_common.sh"
run_310_pipeline --gt_path "$GT_PATH" -- "$@"

echo "== retrieval and evaluation (log: $OUTPUT_DIR/retrieval.log)"
"$PYTHON" -m src.perform_retrieval --query_features "$FEATURES/query_features.h5" \
    --index_features "$FEATURES/index_features.h5" --gt_path "$GT_PATH" --images_path "$IMAGES_PATH" \
    --output_dir "$OUTPUT_DIR"
echo "== wrote $OUTPUT_DIR/mAP.txt and $OUTPUT_DIR/report.html"
