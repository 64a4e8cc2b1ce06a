#!/usr/bin/env bash
# Downloads what training and evaluation start from:
#   - the Keras ResNet50 ImageNet weights (notop h5) the reference trains from, checked by md5;
#   - the official DELF PCA (40-D, no whitening), converted from .datum to pca/*.npy.
# Or, with a model name, one released TF DELF model, imported for MindSpore (src/convert_tf_delf.py):
#   delf_v1  (ICCV'17 DELF, delf_v1_20171026)    -> DOWNLOAD_DIR/delf_v1.ckpt, delf_v1_pca/, delf_v1.yaml
#   delf_gld (Detect-to-Retrieve DELF, GLDv1, delf_gld_20190411) -> DOWNLOAD_DIR/delf_gld.{ckpt,yaml}, ...
#   r50delg_gld, r101delg_gld (DELG, GLDv1, *_20200814), r50delg_gldv2clean, r101delg_gldv2clean (DELG,
#   GLDv2-clean, *_20200914)                      -> DOWNLOAD_DIR/<name>.{ckpt,yaml}
# Usage: bash scripts/download_pretrained.sh [DOWNLOAD_DIR]             (default ./pretrained)
#        bash scripts/download_pretrained.sh MODEL [DOWNLOAD_DIR]         (MODEL: one of the names above)
# Downloads resume, retry, and are skipped when already complete.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/download_common.sh"
PYTHON=${PYTHON:-python3}
MODEL=""
case "${1:-}" in
    delf_v1 | delf_gld | r50delg_gld | r101delg_gld | r50delg_gldv2clean | r101delg_gldv2clean)
        MODEL=$1
        shift
        ;;
esac
DOWNLOAD_DIR=${1:-$ROOT/pretrained}
DOWNLOAD_DIR=$(mkdir -p "$DOWNLOAD_DIR" && cd "$DOWNLOAD_DIR" && pwd)  # absolute: the preset names files by path

# size_matches URL FILE: the server's Content-Length (when it sends one) equals the file's size.
size_matches() {
    local url=$1 file=$2 expected actual
    expected=$(curl --silent --head --location --max-time 30 "$url" | tr -d '\r' \
        | awk 'tolower($1) == "content-length:" {size = $2} END {print size}')
    actual=$(stat -c %s "$file")
    if [[ -n "$expected" && "$expected" != "$actual" ]]; then
        echo "error: $file has $actual bytes, the server announces $expected; removed, rerun to download again" >&2
        rm -f "$file" "$file.done" "$file.valid"
        return 1
    fi
}

# get_tf_model NAME: download, check, unpack and import one released TF DELF or DELG model.
get_tf_model() {
    local name=$1 release
    case "$name" in
        delf_v1) release=delf_v1_20171026 ;;
        delf_gld) release=delf_gld_20190411 ;;
        r50delg_gld | r101delg_gld) release=${name}_20200814 ;;
        r50delg_gldv2clean | r101delg_gldv2clean) release=${name}_20200914 ;;
    esac
    local url="${DELF_RELEASE_BASE_URL:-https://storage.googleapis.com/delf}/$release.tar.gz"  # override: tests
    local archive="$DOWNLOAD_DIR/$release.tar.gz"
    # The import is done when its outputs exist and were written by this very converter code (a
    # changed converter, e.g. a new preset setting, imports again from the kept archive).
    local stamp="$DOWNLOAD_DIR/$name.import" converter
    converter="$release $(cat "$ROOT/src/convert_tf_delf.py" "$ROOT"/src/model/*.py | sha256sum | cut -d' ' -f1)"
    if [[ -f "$DOWNLOAD_DIR/$name.ckpt" && -f "$DOWNLOAD_DIR/$name.yaml" && -f "$stamp" \
          && "$(cat "$stamp")" == "$converter" ]]; then
        echo "[skip] $DOWNLOAD_DIR/$name.ckpt and $name.yaml already imported by this version"
        return 0
    fi
    if [[ ! -f "$archive.valid" ]]; then
        fetch "$url" "$archive" || return 1
        size_matches "$url" "$archive" || return 1
    fi
    fetch_tgz "$url" "$archive" || return 1
    if [[ ! -f "$archive.extracted" ]]; then
        rm -rf "${DOWNLOAD_DIR:?}/$release.unpacked"
        mkdir -p "$DOWNLOAD_DIR/$release.unpacked"
        tar -xzf "$archive" -C "$DOWNLOAD_DIR/$release.unpacked" && touch "$archive.extracted" || return 1
    fi
    local graph
    graph=$(find "$DOWNLOAD_DIR/$release.unpacked" -name saved_model.pb | head -n 1)
    if [[ -z "$graph" ]]; then
        echo "error: $archive holds no saved_model.pb (not a DELF or DELG release?)" >&2
        return 1
    fi
    (cd "$ROOT" && "$PYTHON" src/convert_tf_delf.py --model_dir "$(dirname "$graph")" \
        --ckpt_path "$DOWNLOAD_DIR/$name.ckpt" --preset "$name") || return 1
    echo "$converter" > "$stamp"
    echo "use it: python eval.py ... --ckpt_path $DOWNLOAD_DIR/$name.ckpt --config_path $DOWNLOAD_DIR/$name.yaml"
}

if [[ -n "$MODEL" ]]; then
    get_tf_model "$MODEL" || {
        echo "error: $MODEL not imported (rerun to resume the download)" >&2
        exit 1
    }
    exit 0
fi
mkdir -p "$ROOT/pca"

H5_NAME=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
H5_MD5=a268eb855778b3df3c7506639542a6af
KERAS_TAR_URL=http://storage.googleapis.com/delf/resnet50_imagenet_weights.tar.gz
KERAS_H5_URL=https://github.com/fchollet/deep-learning-models/releases/download/v0.2/$H5_NAME
DELF_TAR_URL=http://storage.googleapis.com/delf/delf_v1_20171026.tar.gz
GITEE_PCA_URL=https://gitee.com/LinPeijia/delf_-pca/repository/archive/master.zip

failed=()

get_keras_weights() {
    local h5="$ROOT/$H5_NAME"
    if [[ -f "$h5" ]] && [[ "$(md5sum "$h5" | cut -d' ' -f1)" == "$H5_MD5" ]]; then
        echo "[skip] $h5 (md5 ok)"
        return 0
    fi
    if fetch "$KERAS_TAR_URL" "$DOWNLOAD_DIR/resnet50_imagenet_weights.tar.gz" \
        && extract "$DOWNLOAD_DIR/resnet50_imagenet_weights.tar.gz" "$DOWNLOAD_DIR/resnet50_imagenet_weights"; then
        local found
        found=$(find "$DOWNLOAD_DIR/resnet50_imagenet_weights" -name "$H5_NAME" | head -n 1)
        [[ -n "$found" ]] && cp "$found" "$h5.partial" && mv "$h5.partial" "$h5"
    fi
    if [[ ! -f "$h5" ]]; then
        echo "falling back to the Keras release of the same file"
        fetch "$KERAS_H5_URL" "$DOWNLOAD_DIR/$H5_NAME" "$H5_MD5" && cp "$DOWNLOAD_DIR/$H5_NAME" "$h5" || return 1
    fi
    local actual
    actual=$(md5sum "$h5" | cut -d' ' -f1)
    if [[ "$actual" != "$H5_MD5" ]]; then
        echo "error: $h5 has md5 $actual, expected $H5_MD5" >&2
        return 1
    fi
    echo "Keras ResNet50 weights: $h5 (md5 ok)"
}

get_delf_pca() {
    if [[ -f "$ROOT/pca/mean.npy" && -f "$ROOT/pca/pca_proj_mat.npy" ]]; then
        echo "[skip] pca/*.npy already present"
        return 0
    fi
    if fetch "$DELF_TAR_URL" "$DOWNLOAD_DIR/delf_v1_20171026.tar.gz" \
        && extract "$DOWNLOAD_DIR/delf_v1_20171026.tar.gz" "$DOWNLOAD_DIR/delf_v1"; then
        local mean projection
        mean=$(find "$DOWNLOAD_DIR/delf_v1" -path '*pca/mean.datum' | head -n 1)
        projection=$(find "$DOWNLOAD_DIR/delf_v1" -path '*pca/pca_proj_mat.datum' | head -n 1)
        if [[ -n "$mean" && -n "$projection" ]]; then
            (cd "$ROOT" && "$PYTHON" -m src.datum_io "$mean" pca/mean.npy \
                && "$PYTHON" -m src.datum_io "$projection" pca/pca_proj_mat.npy) && {
                echo "DELF PCA: pca/mean.npy, pca/pca_proj_mat.npy (40-D, no whitening)"
                return 0
            }
        fi
    fi
    echo "falling back to the MindSpore reference's PCA archive"
    fetch "$GITEE_PCA_URL" "$DOWNLOAD_DIR/delf_pca.zip" || return 1
    rm -rf "$DOWNLOAD_DIR/delf_pca" && mkdir -p "$DOWNLOAD_DIR/delf_pca"
    "$PYTHON" -m zipfile -e "$DOWNLOAD_DIR/delf_pca.zip" "$DOWNLOAD_DIR/delf_pca"
    local name file
    for name in mean pca_proj_mat pca_variances; do
        file=$(find "$DOWNLOAD_DIR/delf_pca" -name "$name.npy" | head -n 1)
        [[ -n "$file" ]] && cp "$file" "$ROOT/pca/$name.npy"
    done
    [[ -f "$ROOT/pca/mean.npy" && -f "$ROOT/pca/pca_proj_mat.npy" ]]
}

get_keras_weights || failed+=("Keras ResNet50 weights")
get_delf_pca || failed+=("DELF PCA")
if ((${#failed[@]})); then
    echo "error: not downloaded: ${failed[*]} (rerun to resume; without internet, fit your own PCA with" \
         "python -m src.fit_pca)" >&2
    exit 1
fi
