#!/usr/bin/env bash
# Build the DELF Ascend 310 runner (ascend310_infer/out/main, or $BUILD_DIR/main).
# Usage: bash ascend310_infer/build.sh
#   MINDSPORE_PATH  the mindspore/ directory with include/api and lib/libmindspore.so: a pip-installed
#                   mindspore-ascend or an unpacked wheel (scripts/fetch_mindspore_cpp.sh). Default: found
#                   with `pip show mindspore-ascend` (then `pip show mindspore`).
#   BUILD_DIR       build directory (default ascend310_infer/out; it is emptied first)
#   ALLOW_MISSING_ASCEND_LIBS=1  link without the Ascend (CANN) libraries, to check the code off Ascend
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

find_mindspore() {
    local package location
    for package in mindspore-ascend mindspore; do
        location=$("$PYTHON" -m pip show "$package" 2>/dev/null | sed -n 's/^Location: //p')
        if [[ -n $location && -f $location/mindspore/include/api/model.h ]]; then
            echo "$location/mindspore"
            return 0
        fi
    done
    return 1
}

if [[ -z ${MINDSPORE_PATH:-} ]]; then
    if ! MINDSPORE_PATH=$(find_mindspore); then
        echo "error: no MindSpore with C++ headers found (pip show mindspore-ascend / mindspore): install" \
             "mindspore-ascend, or set MINDSPORE_PATH to an unpacked wheel's mindspore/ directory" \
             "(bash scripts/fetch_mindspore_cpp.sh prints one)" >&2
        exit 1
    fi
fi
MINDSPORE_PATH=$(cd "$MINDSPORE_PATH" && pwd)
if [[ ! -f $MINDSPORE_PATH/include/api/model.h || ! -f $MINDSPORE_PATH/lib/libmindspore.so ]]; then
    echo "error: MINDSPORE_PATH=$MINDSPORE_PATH has no include/api/model.h and lib/libmindspore.so" >&2
    exit 1
fi
for tool in cmake make g++; do
    command -v "$tool" > /dev/null || { echo "error: $tool not found (apt-get install cmake make g++)" >&2; exit 1; }
done

BUILD_DIR=${BUILD_DIR:-$HERE/out}
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
allow=OFF
[[ ${ALLOW_MISSING_ASCEND_LIBS:-0} == 1 ]] && allow=ON
cmake -S "$HERE" -B "$BUILD_DIR" -DMINDSPORE_PATH="$MINDSPORE_PATH" -DALLOW_MISSING_ASCEND_LIBS=$allow \
    -DCMAKE_BUILD_TYPE=Release > "$BUILD_DIR/cmake.log" 2>&1 || { cat "$BUILD_DIR/cmake.log" >&2; exit 1; }
make -C "$BUILD_DIR" -j"$(nproc 2>/dev/null || echo 2)" --no-print-directory
echo "built $BUILD_DIR/main"
