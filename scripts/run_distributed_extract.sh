#!/usr/bin/env bash
# Extract DELF features of a folder with MindSpore's msrun, WORKER_NUM ranks over one or several machines.
# Each rank takes images r::WORKER_NUM of the sorted list into its own store shard
# (features.h5 -> features.rank<r>-of-<WORKER_NUM>.h5); every reader (eval.py, perform_retrieval,
# feature_io, fit_pca) takes OUTPUT_PATH as the name of the whole set.
# Usage: bash scripts/run_distributed_extract.sh WORKER_NUM LOCAL_WORKER_NUM IMAGES_PATH OUTPUT_PATH [CHECKPOINT] [--key=value ...]
#   One machine: LOCAL_WORKER_NUM = WORKER_NUM. Several: run it on every machine with the same WORKER_NUM,
#   NODE_RANK=0,1,... (this machine's index; its ranks are NODE_RANK*LOCAL_WORKER_NUM + 0..LOCAL_WORKER_NUM-1)
#   and MASTER_ADDR=<address of node 0>; OUTPUT_PATH on storage every machine sees (or gather the shards).
#   A rank that died: run the same command again on its machine (finished images are skipped), or
#   `python src/extract_feature.py ... --rank_id R --rank_size WORKER_NUM` without msrun.
#   Extra arguments go to src/extract_feature.py (--list_images_path, --log_path, config overrides).
#   Environment: MASTER_ADDR (127.0.0.1), MASTER_PORT (8118), NODE_RANK, LOG_DIR (./msrun_log_extract).
#   Memory: in graph mode each rank holds ~7 GB for 640-px images, ~15 GB for 1024-px ones (docs/troubleshooting.md, memory).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() {
    echo "usage: bash scripts/run_distributed_extract.sh WORKER_NUM LOCAL_WORKER_NUM IMAGES_PATH OUTPUT_PATH" \
         "[CHECKPOINT] [--key=value ...]" >&2
    exit 2
}
[[ $# -ge 4 ]] || usage
WORKER_NUM=$1 LOCAL_WORKER_NUM=$2 IMAGES_PATH=$3 OUTPUT_PATH=$4
shift 4
for value in "$WORKER_NUM" "$LOCAL_WORKER_NUM"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "error: worker counts must be positive integers, got '$value'" >&2; exit 2; }
done
(( LOCAL_WORKER_NUM <= WORKER_NUM )) || { echo "error: LOCAL_WORKER_NUM $LOCAL_WORKER_NUM > WORKER_NUM $WORKER_NUM" >&2; exit 2; }
if (( LOCAL_WORKER_NUM < WORKER_NUM )) && [[ -z ${NODE_RANK:-} ]]; then
    echo "error: $LOCAL_WORKER_NUM of $WORKER_NUM workers here: set NODE_RANK (this machine's index) on every machine" >&2
    exit 2
fi
[[ -d $IMAGES_PATH ]] || { echo "error: image directory not found: $IMAGES_PATH" >&2; exit 2; }
EXTRA=()
if [[ $# -ge 1 && $1 != --* ]]; then
    [[ -f $1 ]] || { echo "error: checkpoint not found: $1" >&2; exit 2; }
    EXTRA+=("--ckpt_path=$(realpath "$1")")
    shift
fi
EXTRA+=("$@")
# msrun starts `python` from PATH: make that this environment's interpreter, and use its msrun.
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
BIN_DIR=$(dirname "$PYTHON")
[[ -x $BIN_DIR/msrun ]] || { echo "error: no msrun beside $PYTHON (is MindSpore installed there?)" >&2; exit 2; }
export PATH="$BIN_DIR:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
NODE=()
[[ -n ${NODE_RANK:-} ]] && NODE=("--node_rank=$NODE_RANK")
"$BIN_DIR/msrun" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" ${NODE[@]+"${NODE[@]}"} \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" \
    --log_dir="${LOG_DIR:-./msrun_log_extract}" --join=True \
    "$ROOT/src/extract_feature.py" --images_path "$IMAGES_PATH" --output_path "$OUTPUT_PATH" ${EXTRA[@]+"${EXTRA[@]}"}
