#!/usr/bin/env bash
# Argument handling shared by the multi-process training launchers (sourced).

# stage_arguments STAGE [CHECKPOINT] [--key=value ...]: checks the stage, turns CHECKPOINT into an
# absolute --checkpoint_path (required for attn) and leaves every train.py argument in EXTRA.
stage_arguments() {
    local stage=$1
    shift
    [[ $stage == tuning || $stage == attn || $stage == delg ]] || usage
    EXTRA=()
    if [[ $# -ge 1 && $1 != --* ]]; then
        [[ -f $1 ]] || { echo "error: checkpoint not found: $1" >&2; exit 2; }
        EXTRA+=("--checkpoint_path=$(realpath "$1")")
        shift
    elif [[ $stage == attn && " $* " != *" --checkpoint_path="* ]]; then
        echo "error: the attn stage needs CHECKPOINT (the tuning result)" >&2
        exit 2
    fi
    EXTRA+=("$@")
}
