#!/usr/bin/env bash
# Download the Google Landmarks v2 TRAIN split (https://github.com/cvdfoundation/google-landmark):
# the metadata csv files and image tars images_MIN.tar .. images_MAX.tar (500 tars in all, ~1 GB each).
#
#   bash scripts/download_gldv2.sh MIN MAX DATASET_PATH
#
# Result:
#   DATASET_PATH/train/train.csv, train_clean.csv, train_attribution.csv, train_label_to_category.csv
#   DATASET_PATH/train/<a>/<b>/<c>/<id>.jpg        (the extracted images)
#   DATASET_PATH/tars/images_XXX.tar, md5.images_XXX.txt
# Every tar is checked against its published md5 before it is extracted. Downloads resume, are
# retried, and a rerun skips what is already done, so it is safe to rerun after a failure. Once a tar
# is extracted (marker images_XXX.tar.extracted) the tar itself may be deleted to save space.
set -euo pipefail

usage() {
    echo "usage: bash $0 MIN MAX DATASET_PATH" >&2
    echo "  MIN, MAX: first and last tar to fetch, integers with 0 <= MIN <= MAX <= 499" >&2
    echo "  example: bash $0 0 499 /data/gldv2    (everything, ~1 TB of disk with the tars)" >&2
    exit 2
}

[[ $# -eq 3 ]] || usage
MIN=$1
MAX=$2
DATASET_PATH=$3
for value in "$MIN" "$MAX"; do
    if ! [[ $value =~ ^[0-9]{1,3}$ ]] || (( 10#$value > 499 )); then
        echo "error: '$value' is not an integer in 0..499" >&2
        usage
    fi
done
MIN=$((10#$MIN))
MAX=$((10#$MAX))
if (( MIN > MAX )); then
    echo "error: MIN ($MIN) is greater than MAX ($MAX)" >&2
    usage
fi
[[ -n $DATASET_PATH ]] || usage
for tool in curl md5sum tar; do
    command -v "$tool" > /dev/null || { echo "error: '$tool' is needed but not installed" >&2; exit 1; }
done

# shellcheck source=download_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/download_common.sh"

# GLDV2_BASE_URL points at a mirror: an HTTP(S) server with the same layout as the S3 bucket.
BASE_URL=${GLDV2_BASE_URL:-https://s3.amazonaws.com/google-landmark}
TRAIN_DIR=$DATASET_PATH/train
TAR_DIR=$DATASET_PATH/tars
mkdir -p "$TRAIN_DIR" "$TAR_DIR"
failed=()

for csv in train.csv train_clean.csv train_attribution.csv train_label_to_category.csv; do
    fetch "$BASE_URL/metadata/$csv" "$TRAIN_DIR/$csv" || failed+=("$csv")
done

# download_one XXX: fetch tar XXX and its md5 file, verify, extract. Non-zero on any failure.
download_one() {
    local index=$1
    local tar=$TAR_DIR/images_$index.tar
    local md5_file=$TAR_DIR/md5.images_$index.txt
    if [[ -f "$tar.extracted" ]]; then
        echo "[skip] images_$index.tar (already extracted)"
        return 0
    fi
    fetch "$BASE_URL/md5sum/train/md5.images_$index.txt" "$md5_file" || return 1
    local expected
    expected=$(cut -d' ' -f1 < "$md5_file")
    if ! [[ $expected =~ ^[0-9a-f]{32}$ ]]; then
        echo "error: $md5_file does not start with an md5 sum; removed, rerun to fetch it again" >&2
        rm -f "$md5_file" "$md5_file.done"
        return 1
    fi
    # A second try starts from scratch: fetch deletes a tar whose md5 does not match.
    if ! fetch "$BASE_URL/train/images_$index.tar" "$tar" "$expected" \
        && ! fetch "$BASE_URL/train/images_$index.tar" "$tar" "$expected"; then
        # Twice the wrong md5: the md5 file may be the stale one; fetch it again on the next run.
        rm -f "$md5_file" "$md5_file.done"
        return 1
    fi
    echo "extracting images_$index.tar into $TRAIN_DIR"
    extract "$tar" "$TRAIN_DIR"
}

for ((i = MIN; i <= MAX; i++)); do
    index=$(printf "%03d" "$i")
    download_one "$index" || failed+=("images_$index.tar")
done

total=$((MAX - MIN + 1))
if (( ${#failed[@]} > 0 )); then
    echo "FAILED (${#failed[@]}): ${failed[*]}" >&2
    echo "rerun the same command to resume; finished files are skipped" >&2
    exit 1
fi
echo "done: metadata and $total tar(s) images_$(printf "%03d" "$MIN")..images_$(printf "%03d" "$MAX") in $TRAIN_DIR"
echo "next: python -m src.build_image_dataset --train_csv_path $TRAIN_DIR/train.csv \\"
echo "        --train_clean_csv_path $TRAIN_DIR/train_clean.csv --train_directory $TRAIN_DIR \\"
echo "        --output_directory $DATASET_PATH/mindrecord"
