#!/usr/bin/env bash
# Installs the headless browser the report test renders report.html in (tests/e2e/test_eval_retrieval.py):
# Debian's chromium package, with apt-get as root. Skipped when a Chromium is already installed.
# Usage: bash scripts/setup_browser.sh      (called by scripts/install.sh --test)
set -euo pipefail
for browser in "${CHROMIUM:-}" chromium chromium-browser; do
    if [[ -n "$browser" ]] && command -v "$browser" >/dev/null; then
        exit 0
    fi
done
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "warning: Chromium is missing and only root with apt-get can install it here: install Debian's chromium package (the report's browser test fails without it)" >&2
    exit 0
fi
echo "== installing Debian's chromium for the report's browser test (once)"
log=$(mktemp)
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >"$log" 2>&1; then
    echo "error: apt-get install chromium failed: $(grep -m1 -E '^(E|Err):' "$log" || tail -n1 "$log")" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
