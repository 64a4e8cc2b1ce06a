#!/usr/bin/env bash
# Installs the project's Python requirements into the current interpreter (skipped when present).
# Usage: bash scripts/install.sh [--test]   (--test adds the test-only tools, TensorFlow in a venv
# of its own for the TF-DELF import tests: scripts/setup_tf_env.sh, and Debian's chromium for the
# report's browser test: scripts/setup_browser.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
files=(-r requirements.txt)
[[ "${1:-}" == "--test" ]] && files+=(-r requirements-test.txt)
if ! "$PYTHON" -m pip install --disable-pip-version-check -q "${files[@]}"; then
    echo "error: installing the requirements failed (see pip's message above)" >&2
    exit 1
fi
if [[ "${1:-}" == "--test" ]]; then
    bash scripts/setup_tf_env.sh
    bash scripts/setup_browser.sh
fi
