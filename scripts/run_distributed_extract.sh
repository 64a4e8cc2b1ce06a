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
#   Memory: a graph-mode rank peaked at 2.2 GB over images up to 1024 px with default settings
#   (docs/performance.md, extraction).
#   Bad images never stop a run: msrun kills every rank when one exits non-zero, so each rank exits 0
#   when only images failed and leaves its status in LOG_DIR/rank<r>.status; this script then exits 1
#   with one line per rank whose images failed (listed in <shard>.failures.txt), as
#   src/extract_feature.py does in one process (0 with --skip_bad_images=true). Any other error of a
#   rank stops the run: one line with its message (msrun's own report is in LOG_DIR/msrun.stderr).
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
LOG_DIR=$(realpath -m "${LOG_DIR:-./msrun_log_extract}")
mkdir -p "$LOG_DIR"
FIRST_RANK=$(( ${NODE_RANK:-0} * LOCAL_WORKER_NUM ))  # this machine's ranks: FIRST_RANK + 0..LOCAL_WORKER_NUM-1
for (( rank = FIRST_RANK; rank < FIRST_RANK + LOCAL_WORKER_NUM; rank++ )); do
    rm -f "$LOG_DIR/rank$rank.status"
done
status=0
"$BIN_DIR/msrun" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" ${NODE[@]+"${NODE[@]}"} \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" \
    --log_dir="$LOG_DIR" --join=True \
    "$ROOT/src/extract_feature.py" --images_path "$IMAGES_PATH" --output_path "$OUTPUT_PATH" \
    --status_dir "$LOG_DIR" ${EXTRA[@]+"${EXTRA[@]}"} 2> "$LOG_DIR/msrun.stderr" || status=$?
if (( status != 0 )); then
    # A rank failed for another reason than its images (msrun's traceback is in msrun.stderr): its one line.
    reason=$(grep -h '^error: ' "$LOG_DIR"/worker_*.log 2>/dev/null | tail -n 1 || true)
    echo "error: msrun stopped the run (exit $status)${reason:+: ${reason#error: }}; logs in $LOG_DIR" >&2
    exit "$status"
fi
for (( rank = FIRST_RANK; rank < FIRST_RANK + LOCAL_WORKER_NUM; rank++ )); do
    if [[ ! -f $LOG_DIR/rank$rank.status ]]; then
        echo "error: rank $rank left no status in $LOG_DIR (see $LOG_DIR/worker_$rank.log)" >&2
        status=1
        continue
    fi
    { read -r rank_status; read -r summary || true; } < "$LOG_DIR/rank$rank.status"
    if [[ $rank_status != 0 ]]; then
        echo "$summary" >&2
        status=$rank_status
    fi
done
exit "$status"
