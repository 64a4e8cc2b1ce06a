#!/usr/bin/env bash
# The Ascend-310 path shared by run_infer_310_*.sh (sourced): src.infer_310 extracts the features
# chunk by chunk (preprocess -> runner -> postprocess -> delete; see src/ascend310/driver.py).
# Expects ROOT, PYTHON, MINDIR, DEVICE_ID, IMAGES_PATH and OUTPUT_DIR; leaves the features in $FEATURES.
# Environment: RUNNER (auto, cpp, python), INPUT_MODE (exact, canvas), CHUNK_SIZE, BUILD_DIR.

# run_310_pipeline IMAGE_SOURCE_ARG... -- CONFIG_OVERRIDE...
run_310_pipeline() {
    local source=() runner=()
    while [[ $# -gt 0 && $1 != -- ]]; do source+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    RUNNER=${RUNNER:-auto}
    if [[ $RUNNER == auto ]]; then
        device=$("$PYTHON" -c "from model_utils.device import resolve_device_target; print(resolve_device_target('auto'))")
        RUNNER=$([[ $device == Ascend ]] && echo cpp || echo python)
    fi
    [[ $RUNNER == cpp || $RUNNER == python ]] || { echo "error: RUNNER must be auto, cpp or python, got $RUNNER" >&2; exit 2; }
    INPUT_MODE=${INPUT_MODE:-$([[ $RUNNER == cpp ]] && echo canvas || echo exact)}
    CHUNK_SIZE=${CHUNK_SIZE:-${MAX_PENDING:-16}}
    FEATURES=$OUTPUT_DIR/infer_310_features
    if [[ $RUNNER == cpp ]]; then
        echo "== building the C++ runner (ascend310_infer/build.sh)"
        bash "$ROOT/ascend310_infer/build.sh"
        runner=(--runner_binary "${BUILD_DIR:-$ROOT/ascend310_infer/out}/main")
    fi

    echo "== preprocess -> $RUNNER runner -> postprocess, $CHUNK_SIZE images at a time" \
         "($INPUT_MODE inputs; log: $OUTPUT_DIR/infer_310.log)"
    "$PYTHON" -m src.infer_310 --mindir_path "$MINDIR" --images_path "$IMAGES_PATH" "${source[@]}" \
        --work_path "$OUTPUT_DIR/infer_310_work" --output_dir "$FEATURES" --input_mode "$INPUT_MODE" \
        --chunk_size "$CHUNK_SIZE" "${runner[@]}" --device_id="$DEVICE_ID" --log_path "$OUTPUT_DIR/infer_310.log" "$@"
    rm -rf "$OUTPUT_DIR/infer_310_work"  # only its empty folders are left
}
