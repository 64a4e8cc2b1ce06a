#!/usr/bin/env bash
# The Ascend-310 path shared by run_infer_310_*.sh (sourced): preprocess | runner | postprocess.
# Expects ROOT, PYTHON, MINDIR, DEVICE_ID, IMAGES_PATH and OUTPUT_DIR; leaves the features in $FEATURES.
# Environment: RUNNER (auto, cpp, python), INPUT_MODE (exact, canvas), MAX_PENDING, BUILD_DIR.

# The three stages run at once, handing files over through $WORK; the first failure stops the rest.
declare -gA stage_pid
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

# run_310_pipeline IMAGE_SOURCE_ARG... -- CONFIG_OVERRIDE...
run_310_pipeline() {
    local source=()
    while [[ $# -gt 0 && $1 != -- ]]; do source+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
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

    echo "== preprocess | $RUNNER runner | postprocess ($INPUT_MODE inputs; logs: $OUTPUT_DIR/{preprocess,infer,postprocess}.log)"
    start_stage preprocess "$PYTHON" -m src.preprocess --images_path "$IMAGES_PATH" "${source[@]}" \
        --output_path "$WORK" --input_mode "$INPUT_MODE" --max_pending "${MAX_PENDING:-8}" "$@"
    start_stage infer "${runner[@]}"
    start_stage postprocess "$PYTHON" -m src.postprocess --work_path "$WORK" --mindir_path "$MINDIR" \
        --output_dir "$FEATURES" "$@"
    wait_stages
    rm -rf "$WORK"  # only the two DONE markers are left in it
}
