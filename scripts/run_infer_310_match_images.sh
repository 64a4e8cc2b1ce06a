#!/usr/bin/env bash
# The Ascend-310 inference path on two images: exported MindIR -> src.preprocess -> runner ->
# src.postprocess -> src.match_images.
# Usage: bash scripts/run_infer_310_match_images.sh MINDIR IMAGES_PATH DEVICE_ID [--key=value ...]
#   MINDIR       DELF_MindIR.mindir from export.py (static DELF_MindIR_<H>x<W>.mindir beside it are used
#                for the canvas shapes they fit)
#   --key=value  overrides of delf_config.yaml for preprocess and postprocess (e.g. --extraction.use_pca=false)
# Environment:
#   RUNNER       auto (default: the C++ runner when MindSpore sees an Ascend device, else Python), cpp, python
#   INPUT_MODE   exact (dynamic MindIR, default for python) or canvas (static shapes, default for cpp;
#                needs --extraction.max_image_size=...)
#   OUTPUT_DIR   where test_match.png, the features and the logs go (default .)
#   LIST_IMAGES  the file naming the two images (default list_images.txt)
#   MAX_PENDING  images in flight between the stages (default 8)
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

RUNNER=${RUNNER:-auto}
if [[ $RUNNER == auto ]]; then
    device=$("$PYTHON" -c "from model_utils.device import resolve_device_target; print(resolve_device_target('auto'))")
    RUNNER=$([[ $device == Ascend ]] && echo cpp || echo python)
fi
[[ $RUNNER == cpp || $RUNNER == python ]] || { echo "error: RUNNER must be auto, cpp or python, got $RUNNER" >&2; exit 2; }
INPUT_MODE=${INPUT_MODE:-$([[ $RUNNER == cpp ]] && echo canvas || echo exact)}
WORK=$OUTPUT_DIR/infer_310_work
FEATURES=$OUTPUT_DIR/infer_310_features
rm -rf "$WORK"

if [[ $RUNNER == cpp ]]; then
    echo "== building the C++ runner (ascend310_infer/build.sh)"
    bash "$ROOT/ascend310_infer/build.sh"
    runner=("${BUILD_DIR:-$ROOT/ascend310_infer/out}/main" --mindir_path="$MINDIR" --input_path="$WORK/inputs"
            --output_path="$WORK/outputs" --device_id="$DEVICE_ID")
else
    runner=("$PYTHON" -m src.infer_mindir --mindir_path "$MINDIR" --input_path "$WORK/inputs"
            --output_path "$WORK/outputs" --device_id "$DEVICE_ID")
fi

# The three stages run at once, handing files over through $WORK; the first failure stops the rest.
declare -A stage_pid
start_stage() {
    local name=$1
    shift
    "$@" > "$OUTPUT_DIR/$name.log" 2>&1 &
    stage_pid[$name]=$!
}
wait_stages() {
    local name status other
    while ((${#stage_pid[@]})); do
        for name in "${!stage_pid[@]}"; do
            kill -0 "${stage_pid[$name]}" 2>/dev/null && continue
            status=0
            wait "${stage_pid[$name]}" || status=$?
            unset "stage_pid[$name]"
            if ((status)); then
                for other in "${stage_pid[@]}"; do kill "$other" 2>/dev/null || true; done
                wait || true
                echo "error: $name failed (exit $status); end of $OUTPUT_DIR/$name.log:" >&2
                tail -n 5 "$OUTPUT_DIR/$name.log" >&2
                exit 1
            fi
        done
        sleep 0.5
    done
}

echo "== preprocess | $RUNNER runner | postprocess ($INPUT_MODE inputs; logs: $OUTPUT_DIR/{preprocess,infer,postprocess}.log)"
start_stage preprocess "$PYTHON" -m src.preprocess --images_path "$IMAGES_PATH" --list_images_path "$LIST" \
    --output_path "$WORK" --input_mode "$INPUT_MODE" --max_pending "${MAX_PENDING:-8}" "$@"
start_stage infer "${runner[@]}"
start_stage postprocess "$PYTHON" -m src.postprocess --work_path "$WORK" --mindir_path "$MINDIR" \
    --output_dir "$FEATURES" "$@"
wait_stages
rm -rf "$WORK"  # only the two DONE markers are left in it

echo "== matching (log: $OUTPUT_DIR/match_images.log)"
"$PYTHON" -m src.match_images --images_path "$IMAGES_PATH" --list_images_path "$LIST" \
    --features_path "$FEATURES/features.h5" --output_image "$OUTPUT_DIR/test_match.png" \
    2>&1 | tee "$OUTPUT_DIR/match_images.log"
exit "${PIPESTATUS[0]}"
