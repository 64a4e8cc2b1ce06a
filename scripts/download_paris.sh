#!/usr/bin/env bash
# Download Paris6k (Paris Buildings) for the retrieval evaluation: the images, the original
# ground truth and revisitop's RParis6k ground truth. The 20 images that are broken upstream are
# moved aside (never deleted).
#
# Usage: bash scripts/download_paris.sh DATASET_PATH
#
# Result (the layout the evaluation expects):
#   DATASET_PATH/paris6k_images/*.jpg       6392 readable images, one flat directory
#   DATASET_PATH/paris6k_corrupt/*.jpg      the 20 broken files, kept out of the database
#   DATASET_PATH/paris_120310/*.txt         original gt: <query>_{query,good,ok,junk}.txt
#   DATASET_PATH/gnd_rparis6k.pkl           revisited gt (python -m src.dataset reads it safely)
#   DATASET_PATH/archives/                  the downloaded archives (delete them when done)
# Rerunning resumes interrupted downloads and skips finished steps.
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: $0 DATASET_PATH" >&2
    echo "  downloads Paris6k images (~2.5 GB), paris_120310 and gnd_rparis6k.pkl into DATASET_PATH" >&2
    exit 1
fi
root=$1
archives=$root/archives
# shellcheck source=download_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/download_common.sh"

# Saved as HTML error pages instead of photos (VGG's parisbuildings/corrupt.txt); the usual
# practice, and revisitop's RParis6k, leave them out. The list lives in src/evaluation/ground_truth.py.
mapfile -t CORRUPT_IMAGES < <(cd "$(dirname "${BASH_SOURCE[0]}")/.." && "${PYTHON:-python3}" -c \
    "from src.evaluation.ground_truth import PARIS6K_CORRUPT_IMAGES as names; print(*sorted(names), sep='.jpg\n', end='.jpg\n')")
if [[ ${#CORRUPT_IMAGES[@]} -ne 20 ]]; then
    echo "error: could not read the list of corrupt Paris6k images from src/evaluation/ground_truth.py" >&2
    exit 1
fi

# Mirrors can be used by setting these (the VGG files have moved host before).
paris=${PARIS_BASE_URL:-https://www.robots.ox.ac.uk/~vgg/data/parisbuildings}
revisitop=${REVISITOP_BASE_URL:-http://cmp.felk.cvut.cz/revisitop/data/datasets}
complete_marker=$root/.paris6k.complete
if [[ -f "$complete_marker" ]]; then
    echo "Paris6k is already complete in $root (remove $complete_marker to check again)"
    exit 0
fi

fetch_tgz "$paris/paris_1-v1.tgz" "$archives/paris_1-v1.tgz"
fetch_tgz "$paris/paris_2-v1.tgz" "$archives/paris_2-v1.tgz"
fetch_tgz "$paris/paris_120310.tgz" "$archives/paris_120310.tgz"
fetch_pickle "$revisitop/rparis6k/gnd_rparis6k.pkl" \
    "$root/gnd_rparis6k.pkl"

for part in paris_1-v1 paris_2-v1; do
    extract "$archives/$part.tgz" "$archives/$part.tmp"
    move_files "$archives/$part.tmp" "$root/paris6k_images" "*.jpg"
done
extract "$archives/paris_120310.tgz" "$archives/paris_120310.tmp"
move_files "$archives/paris_120310.tmp" "$root/paris_120310" "*.txt"

moved=()
for name in "${CORRUPT_IMAGES[@]}"; do
    if [[ -f "$root/paris6k_images/$name" ]]; then
        mkdir -p "$root/paris6k_corrupt"
        mv -f "$root/paris6k_images/$name" "$root/paris6k_corrupt/$name"
        moved+=("$name")
    fi
done
if [[ ${#moved[@]} -gt 0 ]]; then
    echo "skipped ${#moved[@]} corrupt image(s), moved to $root/paris6k_corrupt: ${moved[*]}"
fi

num_images=$(find "$root/paris6k_images" -maxdepth 1 -name "*.jpg" | wc -l)
num_queries=$(find "$root/paris_120310" -maxdepth 1 -name "*_query.txt" | wc -l)
echo "Paris6k in $root: $num_images images (expected 6392 or more), $num_queries queries (expected 55)"
if [[ $num_images -lt 6392 || $num_queries -ne 55 ]]; then
    echo "error: unexpected counts; check the archives in $archives" >&2
    exit 1
fi
touch "$complete_marker"
echo "The archives in $archives are no longer needed and can be deleted."
