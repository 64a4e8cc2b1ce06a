#!/usr/bin/env bash
# Installs everything the project needs, then runs the linter and the whole test suite.
# Usage: bash scripts/run_tests.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh --test
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest "$@"
