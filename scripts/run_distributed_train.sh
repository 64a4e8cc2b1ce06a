#!/usr/bin/env bash
# Train one DELF stage (tuning, attn) or DELG (delg) data-parallel on NUM_WORKERS processes of this
# machine through MindSpore's msrun (CPU: the mccl backend; GPU: nccl, one device per worker).
# Usage: bash scripts/run_distributed_train.sh NUM_WORKERS tuning|attn|delg [CHECKPOINT] [--key=value ...]
#   batch_size is the global batch (each worker takes 1/NUM_WORKERS); gradients are averaged;
#   only rank 0 writes checkpoints. Worker logs: $LOG_DIR/worker_<i>.log (default ./msrun_log_<stage>).
#   MASTER_PORT (default 8118) must be free. Runs in the foreground until every worker ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() {
    echo "usage: bash scripts/run_distributed_train.sh NUM_WORKERS tuning|attn|delg [CHECKPOINT] [--key=value ...]" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
NUM_WORKERS=$1
STAGE=$2
shift 2
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_WORKERS must be a positive integer, got '$NUM_WORKERS'" >&2; exit 2; }
# shellcheck source=train_common.sh
source "$ROOT/scripts/train_common.sh"
stage_arguments "$STAGE" "$@"
# msrun starts `python` from PATH: make that this environment's interpreter, and use its msrun.
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
BIN_DIR=$(dirname "$PYTHON")
[[ -x $BIN_DIR/msrun ]] || { echo "error: no msrun beside $PYTHON (is MindSpore installed there?)" >&2; exit 2; }
export PATH="$BIN_DIR:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
LOG_DIR=${LOG_DIR:-./msrun_log_$STAGE}
"$BIN_DIR/msrun" --worker_num="$NUM_WORKERS" --local_worker_num="$NUM_WORKERS" \
    --master_port="${MASTER_PORT:-8118}" --log_dir="$LOG_DIR" --join=True \
    "$ROOT/train.py" "--train_state=$STAGE" ${EXTRA[@]+"${EXTRA[@]}"}
