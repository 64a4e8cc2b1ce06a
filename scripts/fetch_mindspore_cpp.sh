#!/usr/bin/env bash
# Fetch MindSpore's C++ inference headers and library (for compiling ascend310_infer/ off Ascend).
#
# The CPU wheel of MindSpore has no C++ API, and no MindSpore Lite wheel exists for Python 3.11,
# but the mindspore-ascend 1.10.0 wheel (Python 3.9, ~170 MB) holds include/api/*.h and
# lib/libmindspore.so. This downloads it once with pip and unpacks only mindspore/include and
# mindspore/lib (~600 MB) into the cache; running it again does nothing.
#
# Usage: bash scripts/fetch_mindspore_cpp.sh        (prints the unpacked mindspore/ directory last)
#   DELF_CACHE   cache directory (default ~/.cache/delf)
#   PYTHON       interpreter whose pip downloads the wheel (default python3)
set -euo pipefail
PYTHON=${PYTHON:-python3}
VERSION=1.10.0
CACHE=${DELF_CACHE:-$HOME/.cache/delf}
TARGET=$CACHE/mindspore-ascend-$VERSION
MINDSPORE_DIR=$TARGET/mindspore

if [[ -f $MINDSPORE_DIR/include/api/model.h && -f $MINDSPORE_DIR/lib/libmindspore.so ]]; then
    echo "$MINDSPORE_DIR"
    exit 0
fi

mkdir -p "$CACHE/wheels"
shopt -s nullglob
wheels=("$CACHE"/wheels/mindspore_ascend-"$VERSION"-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "downloading mindspore-ascend $VERSION (~170 MB) into $CACHE/wheels" >&2
    if ! "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
            --python-version 3.9 --platform manylinux1_x86_64 -d "$CACHE/wheels" \
            "mindspore-ascend==$VERSION" >&2; then
        echo "error: could not download mindspore-ascend==$VERSION with pip (no network or no package index?)" >&2
        exit 1
    fi
    wheels=("$CACHE"/wheels/mindspore_ascend-"$VERSION"-*.whl)
    [[ ${#wheels[@]} -gt 0 ]] || { echo "error: pip downloaded no mindspore_ascend-$VERSION wheel into $CACHE/wheels" >&2; exit 1; }
fi

# Unpack into a temporary directory beside the target, then rename: never a half-unpacked cache.
staging=$(mktemp -d "$CACHE/.unpack.XXXXXX")
trap 'rm -rf "$staging"' EXIT
"$PYTHON" - "${wheels[0]}" "$staging" <<'PY'
import sys
import zipfile

wheel, destination = sys.argv[1:3]
try:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(("mindspore/include/", "mindspore/lib/"))]
        if not members:
            sys.exit(f"error: {wheel} holds no mindspore/include or mindspore/lib")
        archive.extractall(destination, members)
except zipfile.BadZipFile as error:
    sys.exit(f"error: {wheel} is not a valid wheel ({error}); delete it and run again")
PY
rm -rf "$TARGET"
mv "$staging" "$TARGET"
trap - EXIT
rm -f "${wheels[@]}"  # the unpacked copy is what the check above looks for
echo "$MINDSPORE_DIR"
