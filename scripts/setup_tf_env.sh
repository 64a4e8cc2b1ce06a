#!/usr/bin/env bash
# Creates the test-only TensorFlow environment the TF-DELF import tests compare against
# (tests/model/test_tf_delf_import.py). TensorFlow never enters the project's own environment:
# it lives in a venv of its own, ${DELF_TF_VENV:-$HOME/.cache/delf/tf-venv}; skipped when it works.
# Usage: bash scripts/setup_tf_env.sh      (called by scripts/install.sh --test)
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${DELF_TF_VENV:-$HOME/.cache/delf/tf-venv}
# TF 2.17 still runs TF1 graphs (tf.compat.v1) and works with numpy < 2; tf-slim holds resnet_v1.
PACKAGES=("tensorflow-cpu==2.17.1" "tf-keras==2.17.0" "tf-slim==1.1.0" "numpy<2")
CHECK='import tensorflow, tf_slim, tf_keras, numpy; assert numpy.__version__ < "2"'

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    exit 0
fi
echo "== creating the test-only TensorFlow environment $VENV (once; about 600 MB)"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv --clear "$VENV"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PACKAGES[@]}"; then
    echo "error: installing ${PACKAGES[*]} into $VENV failed (see pip's message above)" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "$CHECK"; then
    echo "error: $VENV was installed but TensorFlow does not import (see above)" >&2
    exit 1
fi
