#!/usr/bin/env bash
# The headless browser for tests/test_annotate_browser.py: Playwright's Python package from PyPI and Debian's
# Chromium from apt (Playwright's own browser download is not used: it fetches from outside the package
# registries). Idempotent and quiet; a second run checks and returns in about a second.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet playwright
fi
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
