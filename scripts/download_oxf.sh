#!/usr/bin/env bash
# Download Oxford5k (Oxford Buildings) for the retrieval evaluation: the 5062 images, the original
# ground truth and revisitop's ROxford5k ground truth.
#
# Usage: bash scripts/download_oxf.sh DATASET_PATH
#
# Result (the layout the evaluation expects):
#   DATASET_PATH/oxbuild_images/*.jpg       5062 images, one flat directory
#   DATASET_PATH/gt_files_170407/*.txt      original gt: <query>_{query,good,ok,junk}.txt
#   DATASET_PATH/gnd_roxford5k.pkl          revisited gt (python -m src.dataset reads it safely)
#   DATASET_PATH/archives/                  the downloaded archives (delete them when done)
# Rerunning resumes interrupted downloads and skips finished steps.
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: $0 DATASET_PATH" >&2
    echo "  downloads Oxford5k images (~1.9 GB), gt_files_170407 and gnd_roxford5k.pkl into DATASET_PATH" >&2
    exit 1
fi
root=$1
archives=$root/archives
# shellcheck source=download_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/download_common.sh"

# Mirrors can be used by setting these (the VGG files have moved host before).
oxford=${OXFORD_BASE_URL:-https://www.robots.ox.ac.uk/~vgg/data/oxbuildings}
revisitop=${REVISITOP_BASE_URL:-http://cmp.felk.cvut.cz/revisitop/data/datasets}
complete_marker=$root/.oxford5k.complete
if [[ -f "$complete_marker" ]]; then
    echo "Oxford5k is already complete in $root (remove $complete_marker to check again)"
    exit 0
fi

fetch_tgz "$oxford/oxbuild_images-v1.tgz" "$archives/oxbuild_images-v1.tgz"
fetch_tgz "$oxford/gt_files_170407.tgz" "$archives/gt_files_170407.tgz"
fetch_pickle "$revisitop/roxford5k/gnd_roxford5k.pkl" \
    "$root/gnd_roxford5k.pkl"

extract "$archives/oxbuild_images-v1.tgz" "$archives/oxbuild_images.tmp"
move_files "$archives/oxbuild_images.tmp" "$root/oxbuild_images" "*.jpg"
extract "$archives/gt_files_170407.tgz" "$archives/gt_files_170407.tmp"
move_files "$archives/gt_files_170407.tmp" "$root/gt_files_170407" "*.txt"

num_images=$(find "$root/oxbuild_images" -maxdepth 1 -name "*.jpg" | wc -l)
num_queries=$(find "$root/gt_files_170407" -maxdepth 1 -name "*_query.txt" | wc -l)
echo "Oxford5k in $root: $num_images images (expected 5062 or more), $num_queries queries (expected 55)"
if [[ $num_images -lt 5062 || $num_queries -ne 55 ]]; then
    echo "error: unexpected counts; check the archives in $archives" >&2
    exit 1
fi
touch "$complete_marker"
echo "The archives in $archives are no longer needed and can be deleted."
