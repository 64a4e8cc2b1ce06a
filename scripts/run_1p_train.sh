#!/usr/bin/env bash
# Train one DELF stage (tuning, attn) or DELG (delg) on one device.
# Usage: bash scripts/run_1p_train.sh tuning|attn|delg [CHECKPOINT] [--foreground] [--key=value ...]
#   tuning, delg: CHECKPOINT (optional) resumes a run of that stage; the backbone comes from imagenet_checkpoint.
#   attn:   CHECKPOINT is the tuning result (or an attn checkpoint to resume).
#   Extra --key=value arguments override delf_config.yaml (e.g. --traindata_path=DIR --device_target=CPU).
# Like the reference it runs in the background, logging to train_<stage>.log in the current
# directory; --foreground (or FOREGROUND=1) keeps it attached and shows the log as it goes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
usage() {
    echo "usage: bash scripts/run_1p_train.sh tuning|attn|delg [CHECKPOINT] [--foreground] [--key=value ...]" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage
STAGE=$1
shift
[[ $STAGE == tuning || $STAGE == attn || $STAGE == delg ]] || usage
CHECKPOINT=""
if [[ $# -ge 1 && $1 != --* ]]; then
    CHECKPOINT=$1
    shift
fi
FOREGROUND=${FOREGROUND:-0}
EXTRA=()
for arg in "$@"; do
    if [[ $arg == --foreground ]]; then FOREGROUND=1; else EXTRA+=("$arg"); fi
done
if [[ -n $CHECKPOINT ]]; then
    [[ -f $CHECKPOINT ]] || { echo "error: checkpoint not found: $CHECKPOINT" >&2; exit 2; }
    EXTRA=("--checkpoint_path=$(realpath "$CHECKPOINT")" ${EXTRA[@]+"${EXTRA[@]}"})
elif [[ $STAGE == attn && " ${EXTRA[*]-} " != *" --checkpoint_path="* ]]; then
    echo "error: the attn stage needs CHECKPOINT (the tuning result)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" GLOG_v=${GLOG_v:-3}
LOG=train_${STAGE}.log
COMMAND=("$PYTHON" "$ROOT/train.py" "--train_state=$STAGE" ${EXTRA[@]+"${EXTRA[@]}"})
if [[ $FOREGROUND == 1 ]]; then
    "${COMMAND[@]}" 2>&1 | tee "$LOG"
    exit "${PIPESTATUS[0]}"
fi
nohup "${COMMAND[@]}" > "$LOG" 2>&1 &
echo "training $STAGE in the background (pid $!); log: $PWD/$LOG"
