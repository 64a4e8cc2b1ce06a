#!/usr/bin/env bash
# Train one DELF stage (tuning, attn) or DELG (delg) data-parallel on the 8 Ascend devices of one
# machine (HCCL rank table).
# Usage: bash scripts/run_8p_train.sh RANK_TABLE_FILE tuning|attn|delg [CHECKPOINT] [--key=value ...]
#   One process per device i, in ./train_parallel<i>/ with DEVICE_ID=RANK_ID=i, logging to
#   train_parallel<i>/train_<stage>.log. batch_size is the global batch (each device takes 1/8);
#   gradients are averaged over the devices; only rank 0 writes checkpoints (train_parallel0/<save_ckpt>).
#   Give traindata_path, imagenet_checkpoint and save_ckpt as absolute paths or relative to train_parallel<i>.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
usage() {
    echo "usage: bash scripts/run_8p_train.sh RANK_TABLE_FILE tuning|attn|delg [CHECKPOINT] [--key=value ...]" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
[[ -f $1 ]] || { echo "error: rank table file not found: $1" >&2; exit 2; }
RANK_TABLE_FILE=$(realpath "$1")
STAGE=$2
shift 2
# shellcheck source=train_common.sh
source "$ROOT/scripts/train_common.sh"
stage_arguments "$STAGE" "$@"
export RANK_TABLE_FILE RANK_SIZE=8 DEVICE_NUM=8
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
CORES_PER_DEVICE=$(( $(nproc) / RANK_SIZE ))
for ((i = 0; i < RANK_SIZE; i++)); do
    rm -rf "train_parallel$i"
    mkdir "train_parallel$i"
    # Pin each process to its own cores, as the reference does, when there are enough.
    PIN=()
    if [[ $CORES_PER_DEVICE -ge 1 ]] && command -v taskset > /dev/null; then
        PIN=(taskset -c "$((i * CORES_PER_DEVICE))-$((i * CORES_PER_DEVICE + CORES_PER_DEVICE - 1))")
    fi
    (
        cd "train_parallel$i"
        export DEVICE_ID=$i RANK_ID=$i
        ${PIN[@]+"${PIN[@]}"} "$PYTHON" "$ROOT/train.py" "--train_state=$STAGE" --device_target=Ascend \
            "--device_id=$i" ${EXTRA[@]+"${EXTRA[@]}"} > "train_$STAGE.log" 2>&1 &
        echo "device $i: pid $!, log train_parallel$i/train_$STAGE.log"
    )
done
