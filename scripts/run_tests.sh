#!/usr/bin/env bash
# Installs everything the project needs, then runs the linters (ruff, import-linter) and the whole test suite.
# Usage: bash scripts/run_tests.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh --test
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
"$PYTHON" -m ruff check .
# The layer contract (pyproject.toml [tool.importlinter]); lint-imports of this interpreter.
"$PYTHON" -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache
"$PYTHON" -m pytest "$@"
